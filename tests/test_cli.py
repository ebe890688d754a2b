"""The command line: an end-to-end run, and every bad input of the core issue -> exit 2, one
stderr line, nothing written."""
import json
import subprocess
import sys

import pytest
import torch

TINY = ["--dataset", "synthetic", "--model", "resnet18", "--width", "4", "--epochs", "1",
        "--batch-size", "32", "--steps", "2", "--step-size", "eps/2", "--train-limit", "64",
        "--no-progress"]


def fastfat(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastfat", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = fastfat("train", "--method", "fat-madry", "--lam", "0.5", "--eps-train", "8/255",
                "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_train_writes_checkpoint_config_and_log(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["method"] == "fat-madry" and cfg["eps_train"] == 8 / 255 and cfg["lam"] == 0.5
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 1
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and "model" in state and "optimizer" in state


def test_eval_writes_records(run_dir, tmp_path):
    r = fastfat("eval", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(tmp_path),
                "--eps-test", "8/255", "0.1", "--attacks", "fgsm", "pgd20", "cw", "--test-limit", "50",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    recs = json.loads((tmp_path / "eval.json").read_text())
    assert [(x["attack"], x["eps"]) for x in recs] == [
        ("clean", 0.0), ("fgsm", 8 / 255), ("fgsm", 0.1), ("pgd20", 8 / 255), ("pgd20", 0.1),
        ("cw", 8 / 255), ("cw", 0.1)]
    for x in recs:
        assert set(x) >= {"attack", "eps", "class_acc", "avg_acc", "vcra", "worst_acc"}
        assert all(0 <= a <= 1 for a in x["class_acc"]) and len(x["class_acc"]) == 10
    assert "PGD-20 8/255" in r.stdout and "var / rob.acc" in r.stdout


def test_help():
    for cmd in ("train", "eval"):
        r = fastfat(cmd, "--help")
        assert r.returncode == 0 and "--eps-" in r.stdout
    assert "--resume" in fastfat("train", "--help").stdout


def test_building_the_command_leaves_scipy_and_pandas_unimported():
    """Every `fastfat` command builds the whole parser, so its modules' imports are every
    command's start-up: scipy (the theory) and pandas (the report) load only when those run."""
    code = ("import sys; from fastfat.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('scipy', 'pandas') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


@pytest.mark.parametrize("args,needle", [
    (["--eps-train", "-0.1"], "eps_train"),
    (["--eps-train", "1.5"], "eps_train"),
    (["--eps-train", "8/0"], "eps"),
    (["--lam", "-1"], "lam"),
    (["--steps", "0"], "steps"),
    (["--model", "vgg99"], "vgg99"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--preset", "turbo"], "preset"),
    (["--dataset", "cifar10", "--data-root", "NOWHERE"], "data_batch_1"),
])
def test_bad_train_input(tmp_path, args, needle):
    out = tmp_path / "out"
    base = [a for a in TINY if a not in ()]
    r = fastfat("train", "--out", str(out), *base, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfat: error:") and needle in lines[0], r.stderr
    assert not out.exists()


def test_refuses_to_overwrite_a_run_without_resume(run_dir):
    r = fastfat("train", "--out", str(run_dir), *TINY)
    assert r.returncode == 2 and "--resume" in r.stderr


def _eval_error(tmp_path, ckpt):
    out = tmp_path / "evalout"
    r = fastfat("eval", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfat: error:"), r.stderr
    assert not out.exists()
    return lines[0]


def test_missing_and_unreadable_checkpoints(tmp_path):
    assert "not found" in _eval_error(tmp_path, tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 100)
    assert "cannot read checkpoint" in _eval_error(tmp_path, bad)


def test_truncated_and_tampered_checkpoints(run_dir, tmp_path):
    data = (run_dir / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert "cannot read checkpoint" in _eval_error(tmp_path, cut)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["model"]["linear.weight"][0, 0] += 1.0   # a valid file whose weights were altered
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    assert "integrity" in _eval_error(tmp_path, tampered)


def test_bad_eval_input(run_dir, tmp_path):
    for args, needle in ((["--eps-test", "-0.1"], "eps_test"), (["--attacks", "deepfool"], "deepfool")):
        out = tmp_path / "e"
        r = fastfat("eval", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out), *args)
        assert r.returncode == 2 and needle in r.stderr and not out.exists()
