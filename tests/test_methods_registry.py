"""The methods registry drives everything a method needs beyond its own module: config fields and
checks, CLI flags, sweep keys, report names, fusion rules. Checked for every registered method,
base (natural, madry, trades, fat-*) and peer alike, so a method added by its module and its
REGISTRY line is wired everywhere, and no module outside the registry and the reference branches
on a method's name."""
import ast
import dataclasses
import pathlib
import re

from fastfat import config, methods
from fastfat.cli import build_parser
from fastfat.config import TrainConfig
from fastfat.report import labels
from fastfat.sweep import grid

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


BASE_METHODS = ("natural", "madry", "trades")
FAIRNESS_METHODS = ("fat-madry", "fat-trades", "cfa-madry", "cfa-trades", "dafa-madry", "dafa-trades", "wat",
                    "frl-rw", "frl-rwrm", "faal", "fair-ard", "absld", "bat")


def test_every_method_is_a_registry_entry_of_one_kind():
    assert set(config.METHODS) == set(BASE_METHODS + FAIRNESS_METHODS) == set(methods.BY_NAME)
    assert config.METHODS[:5] == BASE_METHODS + ("fat-madry", "fat-trades")   # --help and table order
    for m in methods.REGISTRY:
        assert isinstance(m, methods.Method) and issubclass(m.state, methods.MethodState)
        for name, base in m.bases.items():
            assert config.base_method(name) == base
            assert base is None if name in BASE_METHODS else base in ("madry", "trades")
            assert labels.method_name(name) == m.titles[name] and name in labels.METHOD_ORDER
            assert (name in methods.FINE_TUNE) == m.fine_tune
            assert (name in methods.TEACHER) == m.teacher
            assert config.has_lambda(name) == (name in ("fat-madry", "fat-trades"))
            assert config.attacks_in_training(name) == (name != "natural")
            # a fusion family, or the reason the method trains alone
            assert (methods.family(name) is None) == (name not in BASE_METHODS + ("fat-madry", "fat-trades"))
            assert methods.family(name) is not None or m.alone


def test_the_trainer_holds_every_methods_state():
    from fastfat.runfiles import build_for_config
    from fastfat.train import Trainer
    for name in config.METHODS:
        extra = {"val_per_class": 2, "epochs": 110} if name != "natural" else {}   # the peers need them
        extra |= {"init_from": "x.pt"} if name in methods.FINE_TUNE else {}
        extra |= {"teacher": "t.pt"} if name in methods.TEACHER else {}
        cfg = config.make_train_config(None, method=name, dataset="digits", model="cnn", width=4,
                                       eps_train=0.0 if name == "natural" else 0.1, **extra)
        trainer = Trainer(cfg, build_for_config(cfg, "cpu"))
        assert isinstance(trainer.method_state, methods.MethodState)
        assert trainer.method_state.adversarial == (name != "natural")
        # TRADES' KL objective for TRADES and the methods on it, but the authors' FAT-TRADES: CE
        kl = name == "trades" or (methods.BASES[name] == "trades" and name != "fat-trades")
        assert trainer.attack_loss == ("kl" if kl else "ce")


NAME_BRANCH = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](natural|madry|trades|fat-madry|fat-trades)["']""")


def test_no_module_branches_on_a_method_name_outside_the_registry():
    """`method == "natural"`, `in ("trades", "fat-trades")`: the registry (fastfat/methods/) and the
    plain reference (fastfat/reference/, which mirrors the authors' code) are the only places."""
    root = pathlib.Path(methods.__file__).parent.parent
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("methods/") or rel.startswith("reference/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if NAME_BRANCH.search(line.split("#")[0]):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


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


def test_docs_methods_table_lists_every_registered_method():
    """docs/methods.md's table of methods names every --method the registry holds, and no other."""
    text = (pathlib.Path(methods.__file__).parents[2] / "docs" / "methods.md").read_text()
    table = [line.split("|")[2] for line in text.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    listed = {name for cell in table for name in re.findall(r"`([a-z-]+)`", cell) if not name.startswith("--")}
    assert listed == set(config.METHODS)


def test_a_peer_methods_fused_refusal_names_why():
    from fastfat.errors import UserError
    from fastfat.fused.train import check_fusable
    cfg = config.make_train_config(None, method="bat", dataset="digits", model="cnn", eps_train=0.1)
    try:
        check_fusable([cfg, cfg])
    except UserError as e:
        assert methods.BY_NAME["bat"].alone in str(e)
    else:
        raise AssertionError("bat fused")
