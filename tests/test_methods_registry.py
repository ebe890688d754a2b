"""The methods registry drives everything a method needs beyond its own module: config fields and
checks, CLI flags, sweep keys, report names, fusion rules. Checked for every registered method,
so a method added by its module and its REGISTRY line is wired everywhere."""
import ast
import dataclasses
import pathlib

from fastfat import config, methods
from fastfat.cli import build_parser
from fastfat.config import TrainConfig
from fastfat.report import labels
from fastfat.sweep import grid

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def test_every_method_is_named_everywhere():
    for m in methods.REGISTRY:
        for name, base in m.bases.items():
            assert name in config.METHODS and config.base_method(name) == base in ("madry", "trades")
            assert labels.method_name(name) == m.titles[name] and name in labels.METHOD_ORDER
            assert (name in config.FINE_TUNE_METHODS) == m.fine_tune
            assert (name in config.TEACHER_METHODS) == m.teacher


def test_every_hyperparameter_is_a_field_a_flag_and_a_sweep_key():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    seen = set()
    for params in methods.PARAMS:
        for f in dataclasses.fields(params):
            assert f.name not in seen, f"{f.name} declared twice"
            seen.add(f.name)
            assert f.name in TRAIN_FIELDS and f.name in grid.TRAIN_FIELDS
            assert "--" + f.name.replace("_", "-") in help_text
            assert f.metadata.get("help"), f"{f.name} has no help text"
            # the default a fresh config holds is the method's own (its paper's or code's)
            assert getattr(TrainConfig(), f.name) == getattr(params(), f.name)


def test_method_modules_import_neither_config_nor_train():
    for path in pathlib.Path(methods.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module not in ("config", "train"), f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module is None:
                assert not {"config", "train"} & {a.name for a in node.names}, path.name
