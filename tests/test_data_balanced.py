"""--train-per-class: a class-balanced training pool drawn from the seed's stream, validated
before any work, recorded in config.json and the sweep's point key, and the pool the validation
split is held out of."""
from __future__ import annotations

import json

import pytest
import torch

from fastfat import cli
from fastfat.data.split import split_training_set, training_pool
from fastfat.config import make_train_config
from fastfat.data import make_synthetic
from fastfat.data.split import balanced_pool
from fastfat.errors import UserError
from fastfat.sweep import grid


@pytest.mark.parametrize("value,message", [
    (0, "integer >= 1"), (-3, "integer >= 1"), (1.5, "expected an integer"), ("ten", "expected an integer"),
    (True, "expected an integer"), (5001, "at most 5000"),
])
def test_bad_values_refused(value, message):
    with pytest.raises(UserError, match=message):
        make_train_config(dataset="cifar10", train_per_class=value)


def test_bad_combinations_refused():
    with pytest.raises(UserError, match="not both"):
        make_train_config(dataset="digits", train_per_class=10, train_limit=100)
    with pytest.raises(UserError, match="memory or torchvision loader"):
        make_train_config(dataset="digits", train_per_class=10, loader="ffcv")
    with pytest.raises(UserError, match="at most 6000"):
        make_train_config(dataset="fashion-mnist", train_per_class=6001)
    assert make_train_config(dataset="fashion-mnist", train_per_class=6000).train_per_class == 6000


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "x", "200"])
def test_cli_one_line_exit_2_nothing_written(tmp_path, capsys, value):
    """200 passes the config check (digits' size is known only once loaded): its smallest
    class holds fewer, which the load refuses before training."""
    out = tmp_path / "run"
    rc = cli.main(["train", "--preset", "demo", "--epochs", "1", "--train-per-class", value,
                   "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastfat: error:") and "train_per_class" in err[0]
    assert not (out / "checkpoint.pt").exists()


def test_pool_is_balanced_seeded_and_in_order():
    data, _ = make_synthetic(n_train=300)
    a = balanced_pool(data, 7, seed=3)
    assert torch.bincount(a.labels).tolist() == [7] * 10
    b = balanced_pool(data, 7, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = balanced_pool(data, 7, seed=4)
    assert not torch.equal(a.images, c.images)
    # each sample is one of the set's, in the set's order (a subsequence)
    idx = [int((data.images == img).flatten(1).all(1).nonzero()[0]) for img in a.images]
    assert idx == sorted(idx) and len(set(idx)) == 70
    with pytest.raises(UserError, match="class .* has only 30"):
        balanced_pool(data, 31, seed=0)


def test_validation_split_comes_from_the_pool():
    cfg = make_train_config(dataset="synthetic", model="cnn", train_per_class=12, val_per_class=2, seed=1)
    train, val = split_training_set(cfg)
    assert torch.bincount(train.labels).tolist() == [10] * 10
    assert torch.bincount(val.labels).tolist() == [2] * 10
    pool = training_pool(cfg)
    both = torch.cat([train.images, val.images]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, pool.images.flatten(1).tolist()))


def test_recorded_in_config_and_point_key(tmp_path, monkeypatch):
    import fastfat.train as train_mod
    seen = []
    real = train_mod.build_train_loader

    def spy(*a, **k):   # the loader train() builds: it must serve the 5 x 10 pool
        loader = real(*a, **k)
        seen.append(loader.num_samples)
        return loader

    monkeypatch.setattr(train_mod, "build_train_loader", spy)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "synthetic", "--model", "cnn", "--width", "4", "--epochs", "1",
                     "--steps", "1", "--train-per-class", "5", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["train_per_class"] == 5
    assert seen == [50]
    base = make_train_config(dataset="synthetic", model="cnn")
    assert grid.point_key(make_train_config(dataset="synthetic", model="cnn", train_per_class=5)) \
        != grid.point_key(base)
