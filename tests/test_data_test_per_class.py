"""--test-per-class: a stratified test subset (the first N of every class, in the file's order),
for training runs, `fastfat eval` and a sweep's [eval], validated before any work."""
from __future__ import annotations

import json

import pytest
import torch

from fastfat import cli
from fastfat.config import make_eval_config, make_train_config
from fastfat.data import ImageSet, build_loader
from fastfat.data.split import first_per_class
from fastfat.errors import UserError


def test_first_per_class_keeps_the_first_n_of_each_class_in_order():
    labels = torch.tensor([2, 0, 0, 1, 2, 0, 1, 1, 2, 0])
    data = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), labels, 3)
    sub = first_per_class(data, 2)
    # indices 0 (2), 1 (0), 2 (0), 3 (1), 4 (2), 6 (1): the first two of each class, file order kept
    assert sub.images.flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert sub.labels.tolist() == [2, 0, 0, 1, 2, 1]
    assert first_per_class(data, 3).labels.bincount().tolist() == [3, 3, 3]
    with pytest.raises(UserError, match="class 1 has only 3 test samples"):
        first_per_class(data, 4)


def test_loader_serves_the_stratified_digits_subset():
    ld = build_loader("auto", "digits", "test", batch_size=64, per_class=30)
    y = torch.cat([b[1] for b in ld])
    assert y.bincount(minlength=10).tolist() == [30] * 10
    with pytest.raises(UserError, match="not ffcv"):
        build_loader("ffcv", "digits", "test", batch_size=64, per_class=30)


@pytest.mark.parametrize("kwargs,message", [
    (dict(test_per_class=0), "integer >= 1"),
    (dict(test_per_class=2.5), "expected an integer"),
    (dict(test_per_class=5, test_limit=50), "not both"),
    (dict(test_per_class=5, loader="ffcv"), "memory or torchvision loader"),
])
def test_bad_values_refused_in_both_configs(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_eval_config(**kwargs)
    with pytest.raises(UserError, match=message):
        make_train_config(dataset="digits", **kwargs)


def test_known_class_sizes_checked_before_any_work():
    with pytest.raises(UserError, match="holds 1000 samples"):
        make_train_config(dataset="fashion-mnist", test_per_class=1001)
    assert make_train_config(dataset="fashion-mnist", test_per_class=1000).test_per_class == 1000
    with pytest.raises(UserError, match="holds 37 samples"):
        make_train_config(dataset="digits", test_per_class=38)


def _grid(tmp_path, per_class: int) -> str:
    path = tmp_path / "g.toml"
    path.write_text(f'db = "s.db"\n[grid]\nmethod = ["madry"]\neps_train = [0.1]\nmodel = ["cnn"]\n'
                    f'dataset = ["digits"]\nseed = [0]\n[train]\npreset = "demo"\nwidth = 4\nepochs = 1\n'
                    f'train_limit = 64\n[eval]\nattacks = ["fgsm"]\neps_test = [0.1]\n'
                    f'test_per_class = {per_class}\n')
    return str(path)


def test_sweep_refuses_a_subset_the_data_set_cannot_give_before_the_database(tmp_path, capsys):
    rc = cli.main(["sweep", _grid(tmp_path, 38), "--no-progress", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "test_per_class 38" in err[0] and "dataset=digits" in err[0]
    assert not (tmp_path / "s.db").exists()


def test_sweep_evaluates_every_class_on_the_same_count(tmp_path):
    import sqlite3
    assert cli.main(["sweep", _grid(tmp_path, 12), "--no-progress", "--no-report"]) == 0
    con = sqlite3.connect(tmp_path / "s.db")
    evals = [json.loads(e) for e, in con.execute("SELECT eval_config FROM points")]
    counts = {n for n, in con.execute("SELECT count FROM class_acc")}
    classes = con.execute("SELECT COUNT(DISTINCT cls) FROM class_acc").fetchone()[0]
    con.close()
    assert [e["test_per_class"] for e in evals] == [12]
    assert counts == {12} and classes == 10   # every class of every result: 12 test images
