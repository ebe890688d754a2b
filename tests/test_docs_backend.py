"""docs/backend.md's three worked examples run as written on tiny data: the AutoAttack script with
its import changed (and the log it shows has the lines the run prints), FAT in a PGD-AT loop, and
`fastfat eval --model my_models.py:Net --weights w.pt` on the model file the page shows."""
import json
import os
import re
import shlex

import torch
import torch.nn as nn

from fastfat.cli import main
from fastfat.data.datasets import load_dataset

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "backend.md")


def block(marker: str) -> str:
    """The fenced block right after the line `<!-- marker -->`."""
    text = open(PAGE).read()
    m = re.search(r"<!-- " + re.escape(marker) + r" -->\n```\w*\n(.*?)\n```", text, re.S)
    assert m, marker
    return m.group(1)


def digits(n: int):
    test = load_dataset("digits")[1]
    return test.images[:n].float() / 255, test.labels[:n]


def test_example_1_autoattack_script(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = digits(24)
    ns = {"load_my_model": lambda: model, "load_my_test_set": lambda: (x, y)}
    exec(block("example 1"), ns)
    printed = capsys.readouterr().out
    assert ns["x_adv"].shape == x.shape and len(ns["adversary"].fooled_by) == 24
    assert [r["attack"] for r in ns["records"]] == ["clean", "aa"]
    shown = block("output 1")
    for line in ("using standard version including apgd-ce, apgd-t, fab-t, square.", "initial accuracy:",
                 "robust accuracy after APGD-CE:", "max Linf perturbation:", "class-wise accuracy (%)",
                 "VCRA x10^-2", "worst"):
        assert line in printed and line in shown, line


def test_example_2_fat_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    x, y = digits(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    ns = {"model": model, "opt": opt, "loader": [(x[:32], y[:32]), (x[32:], y[32:])]}
    exec(block("example 2"), ns)
    assert model.training and ns["acc"].shape == (10,)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_example_3_eval_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_models.py").write_text(block("example 3: my_models.py") + "\n")
    ns = {}
    exec(block("example 3: my_models.py"), ns)
    torch.manual_seed(0)
    torch.save(ns["Net"](num_classes=10, in_channels=1).state_dict(), tmp_path / "w.pt")
    argv = shlex.split(block("example 3"))
    assert argv[0] == "fastfat"
    assert main(argv[1:] + ["--test-per-class", "2", "--no-progress"]) == 0, capsys.readouterr().err
    recs = json.loads((tmp_path / "results" / "eval.json").read_text())
    assert [r["attack"] for r in recs] == ["clean", "pgd20", "aa"] and recs[0]["class_count"] == [2] * 10
    assert "VCRA x10^-2" in capsys.readouterr().out
