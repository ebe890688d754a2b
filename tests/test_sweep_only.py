"""A sweep file's [only]: some methods on part of the grid's axes, the points it keeps the very
points of the full grid, and every mistake in it one error line before any work."""
from __future__ import annotations

import tomllib

import pytest

from fastfat import cli
from fastfat.errors import UserError
from fastfat.sweep import grid

GRID = '''db = "s.db"
[grid]
method = ["madry", "fat-madry", "dafa-madry"]
eps_train = [0.05, "8/255", 0.15]
lam = [0.5, 1.0]
model = ["cnn"]
dataset = ["digits"]
seed = [0, 1]
[train]
preset = "demo"
width = 4
epochs = 2
train_limit = 64
dafa_warmup = 0.5
[eval]
attacks = ["fgsm"]
eps_test = [0.1]
'''


def _points(tmp_path, only: str = ""):
    return grid.build_sweep(tomllib.loads(GRID + only), str(tmp_path)).points


def _ident(p):
    return p.train.method, round(p.train.eps_train, 6), p.train.lam, p.train.seed


def test_only_keeps_the_methods_points_on_the_named_values(tmp_path):
    full = _points(tmp_path)
    assert len(full) == 3 * 2 + 3 * 2 * 2 + 3 * 2   # madry, fat-madry (two lambdas), dafa-madry
    # DAFA at the middle radius only (spelled as a float where the grid spells it 8/255)
    some = _points(tmp_path, '[only.dafa-madry]\neps_train = [0.03137254901960784]\n')
    dafa = [_ident(p) for p in some if p.train.method == "dafa-madry"]
    assert dafa == [("dafa-madry", round(8 / 255, 6), 0.0, 0), ("dafa-madry", round(8 / 255, 6), 0.0, 1)]
    # every other point is untouched, and the kept points are the full grid's (same keys)
    by_key = {p.key: _ident(p) for p in full}
    assert all(by_key[p.key] == _ident(p) for p in some)
    assert {p.key for p in full} - {p.key for p in some} == {
        p.key for p in full if p.train.method == "dafa-madry" and abs(p.train.eps_train - 8 / 255) > 1e-9}
    # two axes at once, for FAT: lambda 1 at seed 1 only
    two = _points(tmp_path, '[only.fat-madry]\nlam = [1.0]\nseed = 1\n')
    assert sorted(_ident(p)[1:] for p in two if p.train.method == "fat-madry") == [
        (round(8 / 255, 6), 1.0, 1), (0.05, 1.0, 1), (0.15, 1.0, 1)]


@pytest.mark.parametrize("only,message", [
    ('[only.wat]\neps_train = [0.05]\n', "only.wat: 'wat' is not in grid.method"),
    ('[only.madry]\nwidth = [4]\n', "only.madry.width: not one of the grid's other axes"),
    ('[only.madry]\nmethod = ["madry"]\n', "only.madry.method: not one of"),
    ('[only.madry]\neps_train = [0.1]\n', "only.madry.eps_train: 0.1 is not in grid.eps_train"),
    ('[only.madry]\neps_train = []\n', "only.madry.eps_train is empty"),
    ('[only.madry]\nseed = [true]\n', "only.madry.seed: True is not in grid.seed"),
    ('only = 3\n', "only must hold one table per method"),
])
def test_mistakes_are_one_line_before_any_work(tmp_path, capsys, only, message):
    text = GRID.replace('db = "s.db"\n', 'db = "s.db"\n' + only) if not only.startswith("[") else GRID + only
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        grid.build_sweep(tomllib.loads(text), str(tmp_path))
    path = tmp_path / "g.toml"
    path.write_text(text)
    assert cli.main(["sweep", str(path), "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastfat: error:")
    assert not (tmp_path / "s.db").exists()


def test_the_fashion_grid_runs_dafa_and_cfa_at_the_middle_radius_only():
    sweep = grid.build_sweep(*grid.read_sweep_file(None, "fashion"))
    methods = [p.train.method for p in sweep.points]
    assert len(sweep.points) == 33 and methods.count("madry") == 9 and methods.count("fat-madry") == 18
    assert {p.train.eps_train for p in sweep.points if p.train.method in ("dafa-madry", "cfa-madry")} == {0.1}
