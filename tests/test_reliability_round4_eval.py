"""Evaluation and data on the wave-3 surface (issue 31, items 3-7 and 13): each defect's
reproduction, which failed before its fix. A model whose outputs are not finite, a repeated
radius, an empty or mislabelled data file, a failed download and an output name taken by a
directory -> one `fastfat: error:` line, exit 2, before any work, nothing left behind."""
from __future__ import annotations

import os

import pytest
import torch

from fastfat import evaluate as ev, metrics
from fastfat.config import make_eval_config, make_train_config
from fastfat.errors import UserError
from fastfat.files import load_checkpoint, save_checkpoint
from fastfat.sweep import grid, points
from fastfat.train import CHECKPOINT, train
from test_reliability import _main, _one_error_line   # the CLI-in-process helpers of round 1-2
from test_reliability_round3 import TINY, _tree

EVAL = ["--eps-test", "0.1", "--test-limit", "20", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained width-4 checkpoint."""
    out = tmp_path_factory.mktemp("rel4") / "run"
    train(make_train_config(None, **TINY), str(out), progress=False)
    return out


def _altered(src, dst, change) -> str:
    """A copy of checkpoint src with change(model state dict) applied, saved with a valid digest."""
    state = load_checkpoint(str(src))
    change(state["model"])
    save_checkpoint(str(dst), {k: v for k, v in state.items() if k not in ("digest", "format")})
    return str(dst)


def _one_nan(sd) -> None:
    name = next(iter(sd))
    w = sd[name].clone(memory_format=torch.contiguous_format)
    w.view(-1)[0] = float("nan")
    sd[name] = w


def _overflowing(sd) -> None:
    # finite weights whose outputs overflow to inf: the logits check, not the weights', refuses it
    sd["linear.weight"].fill_(3e38)
    sd["linear.bias"].fill_(3e38)


# ---------------------------------------------------------------------------------------------
# 3: a model whose outputs are not finite is refused, never counted correct (NaN's argmax is 0)

@pytest.mark.parametrize("impl", ["fastfat", "pyautoattack"])
@pytest.mark.parametrize("change,needle", [(_one_nan, "hold NaN or inf"), (_overflowing, "on the test data")])
def test_non_finite_model_is_refused_before_any_attack(capsys, run_dir, tmp_path, impl, change, needle):
    ckpt = _altered(run_dir / CHECKPOINT, tmp_path / "bad.pt", change)
    rc, err = _main(capsys, "eval", "--checkpoint", ckpt, "--attacks", "aa", "apgd", "fgsm", "--aa-impl", impl,
                    *EVAL, "--out", str(tmp_path / "ev"))
    _one_error_line(rc, err, needle)
    assert "not finite" in err[0] and ckpt in err[0]
    assert not (tmp_path / "ev" / "eval.json").exists()


def test_check_finite_logits_is_the_one_check():
    metrics.check_finite_logits(torch.zeros(3, 10), "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        logits = torch.zeros(3, 10)
        logits[1, 4] = bad
        with pytest.raises(UserError, match="not finite .* on the test data of m.pt"):
            metrics.check_finite_logits(logits, "the test data of m.pt")


def test_a_sample_with_non_finite_adversarial_logits_is_not_robust():
    """Its outputs say nothing: not a hit, from the logits (PGD) or beside a given verdict (AA)."""
    logits = torch.zeros(4, 10)
    logits[:, 0] = 1.0
    logits[2] = float("nan")
    y = torch.zeros(4, dtype=torch.long)
    correct, total = metrics.class_correct(logits, y, 10)
    assert (correct[0], total[0]) == (3, 4)
    acc = {}
    ev._count(logits, y, 10, acc, ("aa", 0.1), pred=torch.zeros(4, dtype=torch.long))
    assert acc[("aa", 0.1)][0][0] == 3


def test_a_sweep_point_with_non_finite_weights_fails_with_the_reason(run_dir, tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("\n".join(['db = "s.db"', "[grid]", 'method = ["madry"]', 'eps_train = ["8/255"]',
                               "[train]", 'dataset = "synthetic"', 'model = "cnn"', "width = 4", "epochs = 1",
                               "train_limit = 64", 'loader = "memory"', "[eval]", 'attacks = ["aa"]',
                               "eps_test = [0.1]", "test_limit = 20"]) + "\n")
    sweep = grid.build_sweep(*grid.read_sweep_file(str(path), None))
    run = tmp_path / "pt"
    run.mkdir()
    _altered(run_dir / CHECKPOINT, run / CHECKPOINT, _one_nan)
    with pytest.raises(UserError, match="not finite .*hold NaN or inf"):
        points.evaluate_point(sweep.points[0], str(run))


# ---------------------------------------------------------------------------------------------
# 4: a repeated radius or attack, in any spelling, would be counted twice: refused

@pytest.mark.parametrize("flags,needle", [
    (["--attacks", "fgsm", "--eps-test", "0.1", "0.1"], "eps_test: 0.1 is given twice"),
    (["--attacks", "fgsm", "--eps-test", "8/255", "0.03137254901960784"], "eps_test:"),
    (["--attacks", "pgd20", "PGD-20", "--eps-test", "0.1"], "the same attack"),
    (["--attacks", "aa", "autoattack", "--eps-test", "0.1"], "the same attack")])
def test_a_repeated_radius_or_attack_is_refused(capsys, run_dir, tmp_path, flags, needle):
    rc, err = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), *flags, "--test-limit", "20",
                    "--no-progress", "--out", str(tmp_path / "ev"))
    _one_error_line(rc, err, needle)
    assert not (tmp_path / "ev").exists()


def test_a_sweep_files_repeated_radius_is_refused():
    with pytest.raises(UserError, match="eps_test: .* same radius|eps_test: .* given twice"):
        make_eval_config(None, eps_test=["8/255", 0.03137254901960784])
    with pytest.raises(UserError, match=r"\[eval\]: eps_test: .*(same radius|given twice)"):
        grid.build_sweep({"db": "s.db", "grid": {"method": ["madry"]}, "train": {"dataset": "synthetic"},
                          "eval": {"eps_test": ["8/255", "0.0313725490196078431"]}}, ".")


def test_class_count_sums_to_the_samples(capsys, run_dir, tmp_path):
    import json
    rc, _ = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--attacks", "fgsm", "apgd",
                  "--eps-test", "0.1", "0.2", "--test-limit", "10", "--no-progress", "--out", str(tmp_path))
    assert rc == 0
    records = json.loads((tmp_path / "eval.json").read_text())
    assert len(records) == 5 and all(sum(r["class_count"]) == 10 for r in records)


# ---------------------------------------------------------------------------------------------
# 13: an output name taken by a directory is refused before any work (not an IsADirectoryError
# traceback after it), for every file each command writes

@pytest.mark.parametrize("name", ["config.json", "checkpoint.pt", "log.jsonl", "best.pt"])
def test_train_output_name_taken_by_a_directory(capsys, tmp_path, name):
    (tmp_path / "o" / name).mkdir(parents=True)
    rc, err = _main(capsys, "train", "--preset", "demo", "--dataset", "synthetic", "--epochs", "1",
                    "--train-limit", "32", "--no-progress", "--out", str(tmp_path / "o"))
    _one_error_line(rc, err, f"{name} is a directory, not a")
    assert _tree(tmp_path / "o") == [name]


def test_eval_json_taken_by_a_directory(capsys, run_dir, tmp_path):
    (tmp_path / "ev" / "eval.json").mkdir(parents=True)
    rc, err = _main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--attacks", "fgsm", *EVAL,
                    "--out", str(tmp_path / "ev"))
    _one_error_line(rc, err, "eval.json is a directory, not a")


@pytest.mark.parametrize("name", ["report.html", "report.md", "table1_pgd20.csv", "fig.png"])
def test_report_output_name_taken_by_a_directory(capsys, tmp_path, name):
    (tmp_path / "r" / name).mkdir(parents=True)
    (tmp_path / "s.db").write_bytes(b"")
    rc, err = _main(capsys, "report", str(tmp_path / "s.db"), "--out", str(tmp_path / "r"))
    _one_error_line(rc, err, f"{name} is a directory, not a")


def test_sweep_report_name_taken_by_a_directory_is_refused_before_the_sweep(capsys, tmp_path):
    (tmp_path / "s_report" / "report.html").mkdir(parents=True)
    path = tmp_path / "g.toml"
    path.write_text("\n".join(['db = "s.db"', "[grid]", 'method = ["madry"]', "[train]",
                               'dataset = "synthetic"', "epochs = 1", "train_limit = 32"]) + "\n")
    rc, err = _main(capsys, "sweep", str(path), "--no-progress")
    _one_error_line(rc, err, "report.html is a directory, not a")
    assert sorted(os.listdir(tmp_path)) == ["g.toml", "s_report"]


def test_theory_output_name_taken_by_a_directory(capsys, tmp_path):
    (tmp_path / "t" / "theory.png").mkdir(parents=True)
    rc, err = _main(capsys, "theory", "--n", "10", "--repeats", "1", "--out", str(tmp_path / "t"))
    _one_error_line(rc, err, "theory.png is a directory, not a")


# ---------------------------------------------------------------------------------------------
# 5 and 6: every loader refuses a file with no images, and labels that are not whole numbers in
# range (SVHN: 1..10, 10 the digit 0 as torchvision maps it), before any training

from test_data_files import (_cifar_with_labels, idx_bytes, no_system_copy, write_fake_mnist,  # noqa: E402,F401
                             write_fake_stl10, write_fake_svhn)
from fastfat.data import load_dataset  # noqa: E402


def _empty_mnist(root, split):
    raw = root / "FashionMNIST" / "raw"
    write_fake_mnist(root, gz=False)
    for kind, shape in (("images-idx3", (0, 28, 28)), ("labels-idx1", (0,))):
        (raw / f"{split}-{kind}-ubyte").write_bytes(idx_bytes(__import__("numpy").zeros(shape)))
    return "fashion-mnist", str(raw / f"{split}-images-idx3-ubyte")


def _empty_svhn(root, split):
    import numpy as np
    import scipy.io
    write_fake_svhn(root)
    scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": np.zeros((32, 32, 3, 0), np.uint8),
                                                        "y": np.zeros((0, 1), np.uint8)})
    return "svhn", str(root / f"{split}_32x32.mat")


def _empty_stl10(root, split):
    write_fake_stl10(root)
    for kind in ("X", "y"):
        (root / "stl10_binary" / f"{split}_{kind}.bin").write_bytes(b"")
    return "stl10", str(root / "stl10_binary" / f"{split}_X.bin")


def _empty_cifar(root, split):
    _cifar_with_labels(root, [0] * 4)
    name = "data_batch_3" if split == "train" else "test_batch"
    import pickle
    (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps({b"data": __import__("numpy").zeros((0, 3072), "uint8"), b"labels": []}))
    return "cifar10", str(root / "cifar-10-batches-py" / name)


@pytest.mark.parametrize("make", [_empty_svhn, _empty_stl10, _empty_cifar])
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_data_file_with_no_images_is_refused(tmp_path, make, split):
    name, path = make(tmp_path, split)
    with pytest.raises(UserError, match=f"no {'training' if split == 'train' else 'test'} images in "
                                        + path.replace(".", r"\.")):
        load_dataset(name, str(tmp_path))


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_empty_fashion_mnist_is_refused_before_training(capsys, tmp_path, no_system_copy, split):
    name, path = _empty_mnist(tmp_path / "d", split)
    rc, err = _main(capsys, "train", "--preset", "demo", "--dataset", name, "--model", "cnn", "--width", "4",
                    "--epochs", "1", "--data-root", str(tmp_path / "d"), "--no-progress",
                    "--out", str(tmp_path / "o"))
    _one_error_line(rc, err, f"no {'training' if split == 'train' else 'test'} images in {path}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("labels,found", [([1.0, float("nan"), 2.0], "nan"), ([1.0, 1.5, 2.0], "1.5"),
                                          (["1", "2", "3"], "'1'"), ([1, 11, 2], "11"), ([0, 1, 2], "0")])
def test_svhn_labels_must_be_whole_numbers_1_to_10(capsys, tmp_path, labels, found):
    import numpy as np
    import scipy.io
    (tmp_path / "d").mkdir()
    write_fake_svhn(tmp_path / "d")
    scipy.io.savemat(str(tmp_path / "d" / "train_32x32.mat"),
                     {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.array(labels)[:, None]})
    rc, err = _main(capsys, "train", "--preset", "demo", "--dataset", "svhn", "--model", "cnn", "--width", "4",
                    "--epochs", "1", "--data-root", str(tmp_path / "d"), "--no-progress",
                    "--out", str(tmp_path / "o"))
    _one_error_line(rc, err, "train_32x32.mat: labels must be whole numbers 1..10 (10 is the digit 0, mapped "
                             "to 0 as torchvision does), found " + found)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("labels", [[0.5, 1, 2, 3], ["0", "1", "2", "3"]])
def test_cifar_labels_must_be_whole_numbers(tmp_path, labels):
    _cifar_with_labels(tmp_path, labels)
    with pytest.raises(UserError, match="data_batch_2: labels must be whole numbers 0..9"):
        load_dataset("cifar10", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 7: a failed --download creates nothing (what was there stays) and says why in one line.
# The proxy is a refused local port: no request leaves the machine.

@pytest.fixture
def refused_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("dataset", ["mnist", "svhn", "cifar10", "stl10"])
def test_a_failed_download_leaves_nothing_behind(capsys, tmp_path, refused_proxy, dataset):
    (tmp_path / "dl" / "keep").mkdir(parents=True)
    (tmp_path / "dl" / "keep" / "f").write_text("mine")
    for root in (tmp_path / "dl", tmp_path / "dl" / "new" / "sub"):
        rc, err = _main(capsys, "train", "--preset", "demo", "--dataset", dataset, "--data-root", str(root),
                        "--download", "--no-progress", "--out", str(tmp_path / "o"))
        _one_error_line(rc, err, f"could not download {dataset} into {root}: ")
        assert _tree(tmp_path) == ["dl", "dl/keep", "dl/keep/f"]
