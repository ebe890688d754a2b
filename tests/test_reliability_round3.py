"""Bad input, long paths and full disks on the newer surface (issue 25, items 3, 5-7 and 9-18):
each defect's reproduction, which failed before its fix. Bad input -> one `fastfat: error:` line,
exit 2, before any work; a full disk -> one line saying so, nothing half-written left."""
from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import subprocess
import warnings

import pytest

from fastfat import cli
from fastfat.config import make_train_config
from fastfat.sweep import grid, runner
from fastfat.runfiles import CHECKPOINT
from fastfat.train import train
from test_reliability import _main, _one_error_line   # the CLI-in-process helpers of round 1-2

TINY = dict(dataset="synthetic", model="cnn", width=4, epochs=1, batch_size=32, steps=2,
            step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=64, schedule="constant",
            device="cpu", loader="memory")
EVAL = ["--attacks", "fgsm", "--eps-test", "8/255", "--test-limit", "20"]


def _tree(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, n), d) for r, ds, fs in os.walk(d) for n in ds + fs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained width-4 checkpoint."""
    out = tmp_path_factory.mktemp("rel3") / "run"
    train(make_train_config(None, **TINY), str(out), progress=False)
    return out


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A small tmpfs at path (root only), unmounted after; skips where mounting is not permitted."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(d: str, leave: int = 0) -> None:
    """Fill the file system of d up to its last byte, then free `leave` bytes (4 KiB pages)."""
    for name, chunk in (("filler", 4096), ("filler2", 1)):
        fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * chunk):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
    size = os.path.getsize(os.path.join(d, "filler"))
    os.truncate(os.path.join(d, "filler"), max(0, size - leave))


# ---------------------------------------------------------------------------------------------
# 3: a sweep file's init_from and [train] values, checked before the database exists

def _sweep_file(tmp_path, *train_lines, methods='["trades", "frl-rw"]', width=4, val=True) -> str:
    lines = ['db = "s.db"', "threads = 1", "[grid]", f"method = {methods}", 'eps_train = ["8/255"]',
             "[train]", 'dataset = "synthetic"', 'model = "cnn"', f"width = {width}", "epochs = 1",
             "train_limit = 32", 'loader = "memory"', *(["val_per_class = 0.1"] if val else []),
             *train_lines, "[eval]", 'attacks = ["fgsm"]', 'eps_test = ["8/255"]', "test_limit = 20"]
    path = tmp_path / "g.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("value, needle", [
    ('"trade"', 'did you mean the grid method "trades"'),
    ('"TRADES"', 'did you mean the grid method "trades"'),
    ('"missing.pt"', "no such checkpoint"),
    ('"RAW"', "not a valid fastfat checkpoint"),
    ('"RUN"', "width"),            # a width-4 checkpoint in a width-8 grid
])
def test_sweep_init_from_is_checked_before_the_database(tmp_path, capsys, run_dir, value, needle):
    raw = tmp_path / "r.pt"
    raw.write_bytes(pickle.dumps({"a": 1}))
    value = value.replace("RAW", str(raw)).replace("RUN", str(run_dir / CHECKPOINT))
    path = _sweep_file(tmp_path, f"init_from = {value}", width=8)
    rc, lines = _main(capsys, "sweep", path, "--no-progress", "--no-report")
    _one_error_line(rc, lines, needle)
    assert "init_from" in lines[0]
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("line, key", [('clip_grad_norm = "x"', "clip_grad_norm"),
                                       ("val_per_class = [0.1]", "val_per_class"),
                                       ('val_attack = "pgd0"', "val_attack")])
def test_sweep_train_values_name_their_key(tmp_path, capsys, line, key):
    path = _sweep_file(tmp_path, line, val=key != "val_per_class")
    rc, err = _main(capsys, "sweep", path, "--dry-run")
    _one_error_line(rc, err, f"{key}: ")


def test_init_from_natural_finds_the_natural_point(tmp_path):
    path = _sweep_file(tmp_path, 'init_from = "natural"', methods='["natural", "frl-rw"]')
    doc, base = grid.read_sweep_file(path, None)
    sweep = grid.build_sweep(doc, base)
    natural = next(p for p in sweep.points if p.train.method == "natural")
    frl = next(p for p in sweep.points if p.train.method == "frl-rw")
    assert frl.depends_on == natural.key and frl.train.init_from.endswith(natural.key + "/checkpoint.pt")


# ---------------------------------------------------------------------------------------------
# 5, 6, 7: devices, argparse's own refusals, raw pickles

@pytest.mark.parametrize("device", ["mps", "meta"])
def test_unusable_devices_are_one_line(tmp_path, capsys, run_dir, device):
    rc, lines = _main(capsys, "train", "--preset", "demo", "--epochs", "1", "--out", str(tmp_path / "o"),
                      "--device", device)
    _one_error_line(rc, lines, "this build of torch can use auto, cpu")
    rc, lines = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--out",
                      str(tmp_path / "ev"), "--device", device, *EVAL)
    _one_error_line(rc, lines, f"device {device}")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--grid", "demo", "--workers", "x"], "--workers: invalid int value: 'x'"),
    (["sweep", "--grid", "demo", "--lease", "x"], "--lease: invalid float value: 'x'"),
    (["sweep", "--grid", "demo", "--ray", "local", "--ray-cpus", "x"], "--ray-cpus: invalid int"),
    (["data", "convert", "--dataset", "digits", "--out", "b", "--workers", "x"], "--workers: invalid int"),
    (["train", "--preset", "demo", "--out", "o", "--clip-grad-norm", "-inf"], "clip_grad_norm must be in"),
])
def test_argparse_refusals_are_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(argv)
    except SystemExit as e:   # argparse's refusals end the process
        rc = e.code
    _one_error_line(rc, capsys.readouterr().err.strip().splitlines(), needle)
    assert os.listdir(tmp_path) == []


def test_negative_values_reach_the_value_checks():
    """-inf and -1e5 are attached to their flag; plain negatives stay argparse's (a list's values)."""
    assert cli._negatives_attached(["--clip-grad-norm", "-inf", "--lr", "-1e5"]) == [
        "--clip-grad-norm=-inf", "--lr=-1e5"]
    args = cli.build_parser().parse_args(cli._negatives_attached(["sweep", "--grid", "demo", "--lam", "-1", "0.5"]))
    assert vars(args)["grid.lam"] == ["-1", "0.5"]


def test_raw_pickle_checkpoint_is_the_error_line_alone(tmp_path, capsys):
    raw = tmp_path / "r.pt"
    raw.write_bytes(pickle.dumps({"a": 1}))   # protocol 4 or 5: torch warns before refusing it
    for argv in (["eval", "--checkpoint", str(raw), "--out", str(tmp_path / "ev")],
                 ["train", "--preset", "demo", "--epochs", "1", "--init-from", str(raw),
                  "--out", str(tmp_path / "o")]):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            rc, lines = _main(capsys, *argv)
        _one_error_line(rc, lines, "not a valid fastfat checkpoint")
        assert [str(w.message) for w in seen] == []
    assert sorted(os.listdir(tmp_path)) == ["r.pt"]


# ---------------------------------------------------------------------------------------------
# 9, 10: the report on another program's SQLite file, and on a database it only reads

@pytest.mark.parametrize("schema", ["2", "3"])
def test_report_refuses_a_foreign_database_as_sweep_does(tmp_path, capsys, schema):
    db = tmp_path / "l.db"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT); "
                      f"INSERT INTO meta VALUES('schema', '{schema}'); CREATE TABLE points(x, y); "
                      "INSERT INTO points VALUES(1, 2);")
    con.commit()
    con.close()
    before = db.read_bytes()
    rc, lines = _main(capsys, "report", str(db), "--out", str(tmp_path / "rep"))
    _one_error_line(rc, lines, "SQLite database of something else")
    toml = tmp_path / "g.toml"
    toml.write_text(open(_sweep_file(tmp_path, methods='["madry"]', val=False)).read()
                    .replace('db = "s.db"', 'db = "l.db"'))
    rc, lines = _main(capsys, "sweep", str(toml), "--no-progress")
    assert lines[-1].startswith("fastfat: error:") and "SQLite database of something else" in lines[-1]
    assert db.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["g.toml", "l.db"]


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    """A finished one-point sweep's database (its directory holds nothing but it and the runs)."""
    d = tmp_path_factory.mktemp("db")
    doc, base = grid.read_sweep_file(_sweep_file(d, methods='["madry"]', val=False), None)
    assert runner.run_sweep(grid.build_sweep(doc, base), progress=False, report=False)["done"] == 1
    return d


def test_report_leaves_the_directory_as_it_found_it(tmp_path, capsys, small_db):
    before = _tree(small_db)
    assert "s.db-wal" not in before and "s.db-shm" not in before
    rc, _ = _main(capsys, "report", str(small_db / "s.db"), "--out", str(tmp_path / "rep"))
    assert rc == 0 and _tree(small_db) == before
    assert (tmp_path / "rep" / "report.md").exists()


# ---------------------------------------------------------------------------------------------
# 11-13: data convert's --out

def test_convert_out_is_checked_before_any_work(tmp_path, capsys):
    pytest.importorskip("ffcv")
    (tmp_path / "f").write_text("")
    for out, needle in (("", "empty path"), (str(tmp_path / "f" / "sub"), "is not a directory"),
                        (str(tmp_path / ("x" * 300)), "over this file system's limit")):
        rc, lines = _main(capsys, "data", "convert", "--dataset", "digits", "--out", out)
        _one_error_line(rc, lines, needle)
    (tmp_path / "b" / "digits_train.beton" / "keep").mkdir(parents=True)
    rc, lines = _main(capsys, "data", "convert", "--dataset", "digits", "--out", str(tmp_path / "b"), "--force")
    _one_error_line(rc, lines, "is a directory, not a .beton file")
    assert _tree(tmp_path) == ["b", "b/digits_train.beton", "b/digits_train.beton/keep", "f"]


def test_convert_on_a_read_only_mount_and_a_small_disk(tmp_path, capsys):
    pytest.importorskip("ffcv")
    with tmpfs(tmp_path / "m", "1m") as m:
        rc, lines = _main(capsys, "data", "convert", "--dataset", "digits", "--out", os.path.join(m, "b"))
        _one_error_line(rc, lines, "not enough free space")
        assert os.listdir(m) == []      # no empty b/ left behind
        subprocess.run(["mount", "-o", "remount,ro", m], check=True)
        rc, lines = _main(capsys, "data", "convert", "--dataset", "digits", "--out", os.path.join(m, "b"))
        _one_error_line(rc, lines, "is not writable")


# ---------------------------------------------------------------------------------------------
# 14: long names are refused before any work

def test_long_path_components_are_refused_before_work(tmp_path, capsys, run_dir, small_db):
    long = str(tmp_path / ("x" * 300))
    deep = str(tmp_path / "/".join(["y" * 200] * 25))    # 5000 bytes: over PATH_MAX
    for out in (long, deep):
        rc, lines = _main(capsys, "train", "--preset", "demo", "--epochs", "1", "--out", out)
        _one_error_line(rc, lines, "--out")
        rc, lines = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--out", out, *EVAL)
        _one_error_line(rc, lines, "--out")
        rc, lines = _main(capsys, "report", str(small_db / "s.db"), "--out", out)
        _one_error_line(rc, lines, "--out")
    assert os.listdir(tmp_path) == []
    # a long name within the limit (with the atomic write's temporary suffix) is taken
    edge = str(tmp_path / ("z" * 250))
    os.makedirs(edge)
    rc, lines = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--out", edge, *EVAL)
    assert rc == 0, lines


# ---------------------------------------------------------------------------------------------
# 15-18: full disks

def test_first_checkpoint_on_a_full_disk(tmp_path, capsys):
    with tmpfs(tmp_path / "m", "32k") as m:
        out = os.path.join(m, "o")
        rc, lines = _main(capsys, "train", "--preset", "demo", "--epochs", "1", "--width", "8",
                          "--train-limit", "64", "--out", out, "--no-progress")
        _one_error_line(rc, lines, "disk full: cannot write")
        assert "KiB needed" in lines[0]
        assert os.listdir(m) == []      # no config.json without its checkpoint, no empty o/


def test_eval_on_a_full_disk_prints_its_results(tmp_path, capsys, run_dir):
    with tmpfs(tmp_path / "m", "64k") as m:
        _fill(m)
        rc = cli.main(["eval", "--checkpoint", str(run_dir / CHECKPOINT), "--out",
                       os.path.join(m, "ev"), "--no-progress", *EVAL])
        cap = capsys.readouterr()
        _one_error_line(rc, cap.err.strip().splitlines(), "disk full")
        assert '"attack": "fgsm"' in cap.out and '"class_acc"' in cap.out   # the work is not lost
        assert sorted(os.listdir(m)) == ["filler", "filler2"]                # no empty ev/


def test_report_on_a_full_disk_leaves_no_part(tmp_path, capsys, small_db):
    with tmpfs(tmp_path / "m", "256k") as m:
        _fill(m, leave=12 * 1024)   # room for some tables, not for the figures
        rc, lines = _main(capsys, "report", str(small_db / "s.db"), "--out", os.path.join(m, "rep"))
        _one_error_line(rc, lines, "disk full")
        assert sorted(os.listdir(m)) == ["filler", "filler2"]
        os.makedirs(os.path.join(m, "old"))
        (open(os.path.join(m, "old", "mine.txt"), "w")).close()
        rc, lines = _main(capsys, "report", str(small_db / "s.db"), "--out", os.path.join(m, "old"))
        _one_error_line(rc, lines, "disk full")
        assert os.listdir(os.path.join(m, "old")) == ["mine.txt"]


def test_sweep_database_on_a_full_disk_is_not_left(tmp_path, capsys):
    with tmpfs(tmp_path / "m", "64k") as m:
        _fill(m)
        path = _sweep_file(tmp_path, methods='["madry"]', val=False)
        rc, lines = _main(capsys, "sweep", path, "--db", os.path.join(m, "s.db"), "--no-progress")
        assert rc == 2 and lines[-1].startswith("fastfat: error:") and "full" in lines[-1], lines
        assert sorted(os.listdir(m)) == ["filler", "filler2"]
