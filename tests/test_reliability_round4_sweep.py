"""Sweeps and teachers on the round-4 surface (issue 31, items 1, 2 and 8-12): each defect's
reproduction, which failed before its fix. Bad input -> one `fastfat: error:` line, exit 2,
before the database exists; a full disk -> the sweep stops at once, its points left pending."""
from __future__ import annotations

import os
import pickle
import sqlite3

import pytest

from fastfat import cli
from fastfat.config import make_train_config
from fastfat.sweep import grid
from fastfat.train import CHECKPOINT, train
from test_reliability import _main, _one_error_line   # the CLI-in-process helpers of round 1-2
from test_reliability_round3 import _fill, tmpfs

TINY = dict(dataset="digits", model="cnn", width=4, epochs=1, batch_size=32, steps=2,
            step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=64, schedule="constant",
            device="cpu", loader="memory")


def _grid(tmp_path, *lines, methods='["madry", "fat-madry"]', name="g.toml", **axes) -> str:
    """A tiny digits sweep file: the given methods at 8/255 (or `axes`' lists), 1 epoch, FGSM on
    20 test images; extra [train] lines appended (other tables after them)."""
    axes = {"method": methods, "eps_train": '["8/255"]', **axes}
    text = ['db = "s.db"', "threads = 1", "[grid]", *(f"{k} = {v}" for k, v in axes.items()),
            "[eval]", 'attacks = ["fgsm"]', 'eps_test = ["8/255"]', "test_limit = 20",
            "[train]", 'dataset = "digits"', 'model = "cnn"', "width = 4", "epochs = 1",
            "train_limit = 200", *lines]
    path = tmp_path / name
    path.write_text("\n".join(text) + "\n")
    return str(path)


def _build(path, **kw):
    doc, base = grid.read_sweep_file(path, None)
    return grid.build_sweep(doc, base, **kw)


# ---------------------------------------------------------------------------------------------
# 8, 9: [only] on an axis the method ignores; the packaged grid narrowed by flags

def test_only_on_an_axis_the_method_ignores_keeps_its_point(tmp_path, capsys):
    path = _grid(tmp_path, lam="[0.5, 1.0]")
    with open(path, "a") as f:
        f.write("[only.madry]\nlam = [1.0]\n[only.fat-madry]\nlam = [1.0]\n")
    methods = [(p.train.method, p.train.lam) for p in _build(path).points]
    assert methods == [("madry", 0.0), ("fat-madry", 1.0)]
    # a madry-only grid is its one point, never an empty grid
    only_madry = _grid(tmp_path, methods='["madry"]', lam="[0.5, 1.0]", name="m.toml")
    with open(only_madry, "a") as f:
        f.write("[only.madry]\nlam = [1.0]\n")
    rc = cli.main(["sweep", only_madry, "--dry-run"])
    assert rc == 0 and "\n1 points;" in "\n" + capsys.readouterr().out


@pytest.mark.parametrize("flags, methods, eps", [
    (["--method", "madry", "fat-madry"], {"madry", "fat-madry"}, {0.05, 0.1, 0.15}),
    (["--eps-test", "0.05"], {"madry", "fat-madry", "dafa-madry", "cfa-madry"}, {0.05, 0.1, 0.15}),
    (["--eps-train", "0.05"], {"madry", "fat-madry", "dafa-madry", "cfa-madry"}, {0.05}),
    (["--method", "dafa-madry", "--seed", "0"], {"dafa-madry"}, {0.1}),
])
def test_the_fashion_grid_is_narrowed_by_flags(tmp_path, capsys, monkeypatch, flags, methods, eps):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["sweep", "--grid", "fashion", "--dry-run", *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc, base = grid.read_sweep_file(None, "fashion")
    grid_flags, eval_flags, name = {}, {}, None
    for f in flags:   # the flags as the CLI passes them: grid axes and [eval] fields
        if f.startswith("--"):
            name = f[2:].replace("-", "_")
        else:
            (eval_flags if name == "eps_test" else grid_flags).setdefault(name, []).append(f)
    points = grid.build_sweep(doc, base, grid_flags=grid_flags, eval_flags=eval_flags).points
    assert {p.train.method for p in points} == methods
    assert {round(p.train.eps_train, 6) for p in points} == eps
    assert f"\n{len(points)} points;" in out
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# 1: FRL points fine-tune from the grid's natural point

def test_frl_fine_tunes_from_the_grids_natural_point(tmp_path, capsys):
    path = _grid(tmp_path, 'init_from = "natural"', "val_per_class = 0.1", methods='["natural", "frl-rw"]')
    rc = cli.main(["sweep", path, "--no-progress", "--no-report"])
    out, err = capsys.readouterr()
    assert rc == 0 and "FAILED" not in out, out + err
    con = sqlite3.connect(tmp_path / "s.db")
    rows = dict(con.execute("SELECT method, status FROM points").fetchall())
    con.close()
    assert rows == {"natural": "done", "frl-rw": "done"}


def test_a_point_whose_source_failed_says_so(tmp_path, capsys):
    # lr 1e12: the natural point diverges; the FRL point is not started from a checkpoint that
    # is not there, it fails naming its source
    path = _grid(tmp_path, 'init_from = "natural"', "val_per_class = 0.1", "lr = 1e12",
                 methods='["natural", "frl-rw"]')
    rc = cli.main(["sweep", path, "--no-progress", "--no-report"])
    out, _ = capsys.readouterr()
    assert rc == 1
    frl = next(line for line in out.splitlines() if line.startswith("FAILED frl-rw"))
    assert "checkpoint not found" not in frl and "natural cnn digits" in frl and "failed" in frl, out


# ---------------------------------------------------------------------------------------------
# 10-12: a teacher is checked before the run, refused where no method distils, finite

class _Evil:
    """A pickle that would write a file when loaded (torch.load without weights_only)."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teacher files: a digits run's checkpoint, a synthetic-data one, the digits one with a NaN
    weight (a valid digest), a malicious pickle (and the file it would create)."""
    from fastfat.files import load_checkpoint, save_checkpoint
    d = tmp_path_factory.mktemp("teachers")
    train(make_train_config(None, **TINY), str(d / "digits"), progress=False)
    train(make_train_config(None, **dict(TINY, dataset="synthetic")), str(d / "synth"), progress=False)
    state = load_checkpoint(str(d / "digits" / CHECKPOINT))
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[0] = float("nan")
    del state["digest"], state["format"]
    save_checkpoint(str(d / "nan.pt"), state)
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"model": _Evil(str(d / "pwned"))}, f)
    return {"digits": str(d / "digits" / CHECKPOINT), "synth": str(d / "synth" / CHECKPOINT),
            "nan": str(d / "nan.pt"), "evil": str(d / "evil.pt"), "pwned": str(d / "pwned")}


@pytest.mark.parametrize("which, needle", [("missing", "no such checkpoint"),
                                           ("synth", "was trained on synthetic"),
                                           ("evil", "not a valid fastfat checkpoint"),
                                           ("nan", "not finite")])
def test_sweep_teacher_is_checked_before_the_database(tmp_path, capsys, teachers, which, needle):
    path = _grid(tmp_path, f'teacher = "{teachers.get(which, tmp_path / "missing.pt")}"',
                 methods='["madry", "fair-ard"]')
    rc, lines = _main(capsys, "sweep", path, "--no-progress", "--no-report")
    _one_error_line(rc, lines, needle)
    assert "teacher" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["g.toml"]
    assert not os.path.exists(teachers["pwned"])     # the pickle never ran


def test_teacher_with_nan_weights_is_named_by_train(tmp_path, capsys, teachers):
    rc, lines = _main(capsys, "train", "--preset", "demo", "--dataset", "digits", "--epochs", "1",
                      "--width", "4", "--train-limit", "64", "--method", "fair-ard", "--teacher",
                      teachers["nan"], "--out", str(tmp_path / "o"), "--no-progress")
    _one_error_line(rc, lines, "teacher")
    assert teachers["nan"] in lines[0] and "not finite" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["madry", "bat", "natural"])
def test_teacher_is_refused_where_the_method_does_not_distil(tmp_path, capsys, teachers, method):
    rc, lines = _main(capsys, "train", "--preset", "demo", "--method", method, "--epochs", "1",
                      "--teacher", teachers["digits"], "--out", str(tmp_path / "o"), "--no-progress")
    _one_error_line(rc, lines, f"method {method} does not distil")
    assert os.listdir(tmp_path) == []
    # a sweep: a [train] teacher for a grid where no method distils is refused the same way
    path = _grid(tmp_path, f'teacher = "{teachers["digits"]}"', methods=f'["{method}"]')
    rc, lines = _main(capsys, "sweep", path, "--dry-run")
    _one_error_line(rc, lines, "no method of the grid distils from a teacher")
    # in a grid with a distilling method the shared teacher is that method's alone
    path = _grid(tmp_path, f'teacher = "{teachers["digits"]}"', methods=f'["{method}", "fair-ard"]',
                 name="h.toml")
    points = {p.train.method: p.train.teacher for p in _build(path).points}
    assert points == {method: None, "fair-ard": teachers["digits"]}


# ---------------------------------------------------------------------------------------------
# 2: a full disk under the runs stops the sweep at once, its points left pending

def test_full_disk_stops_the_sweep_and_the_rerun_finishes_it(tmp_path, capsys):
    path = _grid(tmp_path, methods='["madry", "fat-madry"]', seed="[0, 1]")
    with tmpfs(tmp_path / "m", "1m") as m:
        _fill(m)
        rc = cli.main(["sweep", path, "--shared-dir", os.path.join(m, "runs"), "--no-progress",
                       "--no-report"])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        _one_error_line(rc, lines, "disk full")
        assert "4 points left pending" in lines[0] and "run the same command again" in lines[0]
        assert "FAILED" not in out
        con = sqlite3.connect(tmp_path / "s.db")
        assert [s for s, in con.execute("SELECT status FROM points")] == ["pending"] * 4
        assert con.execute("SELECT COUNT(*) FROM points WHERE owner IS NOT NULL").fetchone()[0] == 0
        con.close()
        os.unlink(os.path.join(m, "filler"))   # space freed: the same command runs every point
        rc = cli.main(["sweep", path, "--shared-dir", os.path.join(m, "runs"), "--no-progress",
                       "--no-report"])
        assert rc == 0, capsys.readouterr()
