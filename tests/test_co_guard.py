"""The catastrophic-overfitting guard (fastfat.guard), its database columns and the report's list
of flagged epochs (fastfat.report.co_flags), and bad single-step input refused in one line."""
import os
import sqlite3

import pytest
import torch

from fastfat import guard
from fastfat.config import make_train_config
from fastfat.errors import UserError
from fastfat.report.co_flags import flagged_epochs, flagged_markdown, report_section
from fastfat.sweep.store import Store
from fastfat.train import train
from test_reliability import _main, _one_error_line
from test_report_seeds import db  # noqa: F401  (a fixture: a finished sweep database)

TINY = dict(dataset="synthetic", model="cnn", width=4, epochs=3, batch_size=32, eps_train=8 / 255,
            lr=0.05, train_limit=64, schedule="constant", device="cpu")


# ---------------------------------------------------------------------------------------------
# The flag rule

def _log(*pgd):
    return [{"co_pgd_acc": p} for p in pgd]


def test_flag_rule():
    assert not guard.flagged(_log(0.5), 0.5)                       # nothing to fall from
    assert guard.flagged(_log(0.5, 0.6, 0.2), 0.5)                 # below half the best, 0.4 lower
    assert not guard.flagged(_log(0.5, 0.6, 0.31), 0.5)            # not below half
    assert not guard.flagged(_log(0.15, 0.06), 0.5)                # near chance: under MIN_DROP
    assert guard.flagged(_log(0.5, 0.6, 0.4), 0.3)                 # a stricter threshold
    assert not guard.flagged([{"co_pgd_acc": 0.6}, {}, {"co_pgd_acc": 0.5}], 0.5)


# ---------------------------------------------------------------------------------------------
# A provoked collapse: the guard's scores fall as an attack-masking model's would

def _collapse(monkeypatch, pgd_accs):
    """Replace the guard's scoring by a scripted sequence of PGD accuracies (FGSM's rising), so a
    run's rows go through the real flag and stop logic."""
    accs = iter(pgd_accs)

    def score(self, model):
        p = next(accs)
        return {"co_fgsm_acc": 0.9 - p, "co_pgd_acc": p, "co_held_out": self.held_out}

    monkeypatch.setattr(guard.Guard, "score", score)


def test_warn_flags_and_trains_on(monkeypatch, tmp_path, capsys):
    _collapse(monkeypatch, [0.4, 0.5, 0.05])
    _, log = train(make_train_config(None, train_attack="n-fgsm", **TINY), str(tmp_path), progress=False)
    assert [r["co_flag"] for r in log] == [0, 0, 1]
    assert "epoch 3: PGD accuracy on the guard batch fell to 0.050 from its best 0.500" in capsys.readouterr().err


def test_stop_keeps_the_best_weights_and_resume_is_finished(monkeypatch, tmp_path):
    _collapse(monkeypatch, [0.3, 0.5, 0.4, 0.1, 0.6])
    cfg = make_train_config(None, train_attack="fgsm-rs", co_guard="stop", **{**TINY, "epochs": 5})
    snaps = {}
    model, log = train(cfg, str(tmp_path), progress=False,
                       on_epoch=lambda r: snaps.setdefault(r["epoch"], None))
    assert [r["co_flag"] for r in log] == [0, 0, 0, 2] and log[-1]["co_best_epoch"] == 2
    best = torch.load(tmp_path / "co_best.pt", weights_only=True)["model"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k, v in best.items():
        assert torch.equal(ckpt["model"][k], v) and torch.equal(model.state_dict()[k], v)
    # a resumed stopped run is finished: no epoch trained, the same log
    _, again = train(cfg, str(tmp_path), resume=True, progress=False)
    assert again == log


def test_real_guard_scores_on_the_validation_split(tmp_path):
    cfg = make_train_config(None, train_attack="n-fgsm", val_per_class=2, **{**TINY, "epochs": 1, "train_limit": 160})
    _, log = train(cfg, str(tmp_path), progress=False)
    r = log[0]
    assert r["co_held_out"] is True and r["co_flag"] == 0
    assert 0 <= r["co_pgd_acc"] <= 1 and 0 <= r["co_fgsm_acc"] <= 1
    cfg = make_train_config(None, train_attack="n-fgsm", **{**TINY, "epochs": 1})
    assert train(cfg, None, progress=False)[1][0]["co_held_out"] is False
    # off for PGD by default: no guard fields
    assert "co_pgd_acc" not in train(make_train_config(None, **{**TINY, "epochs": 1}), None, progress=False)[1][0]


# ---------------------------------------------------------------------------------------------
# Database and report

def test_store_keeps_the_guard_and_co_flags_lists_flagged_epochs(monkeypatch, tmp_path):
    from fastfat.sweep.grid import build_sweep

    doc = {"db": "s.db", "grid": {"method": ["madry"], "eps_train": [8 / 255], "train_attack": ["pgd", "n-fgsm"]},
           "train": {k: v for k, v in TINY.items() if k not in ("device", "eps_train")}}
    sweep = build_sweep(doc, str(tmp_path))
    assert [p.train.train_attack for p in sweep.points] == ["pgd", "n-fgsm"]
    store = Store(sweep.db)
    for p in sweep.points:
        store.add_point(p.to_point("r"))
    nf = sweep.points[1].key
    store.claim(nf)
    rows = [{"epoch": 1, "loss": 1.0, "co_fgsm_acc": 0.3, "co_pgd_acc": 0.5, "co_flag": 0},
            {"epoch": 2, "loss": 1.0, "co_fgsm_acc": 0.8, "co_pgd_acc": 0.1, "co_flag": 1}]
    for r in rows:
        store.record_epoch(nf, r)
    flagged = flagged_epochs(store.db)
    assert len(flagged) == 1
    f = flagged[0]
    assert (f["key"], f["epoch"], f["train_attack"], f["best_pgd_acc"], f["stopped"]) == (nf, 2, "n-fgsm", 0.5, False)
    md = flagged_markdown(flagged)
    assert "| madry | n-fgsm | 0.03137 | 0 | 0 | 2 | 10.0 | 50.0 | 80.0 | no |" in md
    assert "No epoch was flagged" in flagged_markdown([])
    store.close()
    assert report_section(sweep.db) == md


def test_report_section_is_empty_without_guarded_epochs(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    store.close()
    assert report_section(str(tmp_path / "s.db")) == ""


def test_co_flags_reads_an_old_database(tmp_path):
    """A database whose epochs table predates the guard: no flagged epochs, nothing written."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE epochs (point TEXT, epoch INTEGER, loss REAL)")
    con.commit()
    assert flagged_epochs(con) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written

@pytest.mark.parametrize("flags,needle", [
    (["--train-attack", "fgsm"], "train_attack: unknown value 'fgsm'"),
    (["--train-attack", "n-fgsm", "--nfgsm-noise", "-1"], "nfgsm_noise must be in [0.0, inf)"),
    (["--train-attack", "n-fgsm", "--nfgsm-noise", "nan"], "nfgsm_noise: expected a number"),
    (["--train-attack", "n-fgsm", "--nfgsm-noise", "inf"], "nfgsm_noise must be in"),
    (["--train-attack", "n-fgsm", "--method", "bat"], "method bat cannot train with a single-step attack"),
    (["--train-attack", "fgsm-rs", "--method", "natural", "--eps-train", "0"], "method natural cannot"),
    (["--co-guard", "sometimes"], "co_guard: unknown value"),
    (["--co-threshold", "0"], "co_threshold must be in (0.0, 1.0]"),
    (["--train-attack", "n-fgsm", "--single-step-size", "eps/0"], "single_step_size: not a step size"),
])
def test_bad_input_is_one_line(capsys, tmp_path, flags, needle):
    out = tmp_path / "run"
    rc, lines = _main(capsys, "train", "--dataset", "synthetic", "--out", str(out), *flags)
    _one_error_line(rc, lines, needle)
    assert not out.exists()


def test_fair_ard_refuses_in_the_api():
    with pytest.raises(UserError, match="method fair-ard cannot train with a single-step attack"):
        make_train_config(None, method="fair-ard", teacher="t.pt", train_attack="fgsm-rs", dataset="synthetic")


# ---------------------------------------------------------------------------------------------
# A real collapse: plain FGSM (N-FGSM without noise) at a large eps on Fashion-MNIST

def test_plain_fgsm_collapses_and_the_guard_stops_it(tmp_path):
    """FGSM without a random start at eps 0.2 on 1,000 Fashion-MNIST images: PGD accuracy on the
    guard batch climbs to ~15% and falls to ~1% by epoch 8 while FGSM accuracy stays ~25%
    (catastrophic overfitting, measured on this CPU). The guard flags it, stops the run and leaves
    the best epoch's weights as the checkpoint. Skipped where Fashion-MNIST is not installed."""
    from fastfat.data import mnist

    if not all(mnist._find(mnist.SOURCES["fashion-mnist"][2][0])) and os.environ.get("CI", "").lower() != "true":
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    cfg = make_train_config("demo", dataset="fashion-mnist", train_per_class=100, width=16, epochs=10,
                            eps_train=0.2, schedule="constant", train_attack="n-fgsm", nfgsm_noise=0.0,
                            co_guard="stop", device="cpu")
    model, log = train(cfg, str(tmp_path), progress=False)
    last = log[-1]
    assert last["co_flag"] == guard.STOPPED, [(r["co_pgd_acc"], r["co_fgsm_acc"]) for r in log]
    best = max(r["co_pgd_acc"] for r in log[:-1])
    assert last["co_pgd_acc"] < 0.5 * best and last["co_fgsm_acc"] > last["co_pgd_acc"] + 0.1
    assert log[last["co_best_epoch"] - 1]["co_pgd_acc"] == best
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    best_w = torch.load(tmp_path / "co_best.pt", weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in best_w.items())


def test_the_report_lists_flagged_epochs(db, tmp_path):
    """report.md and report.html carry the guard's section where an epoch was flagged."""
    import shutil

    from fastfat.report import report
    path = str(tmp_path / "s.db")
    shutil.copy(db, path)
    with Store(path) as st:   # opening adds the guard's columns to the epochs table
        key = st.db.execute("SELECT key FROM points ORDER BY key LIMIT 1").fetchone()[0]
        st.db.execute("INSERT INTO epochs (point, epoch, loss, co_fgsm_acc, co_pgd_acc, co_flag) "
                      "VALUES (?, 3, 1.0, 0.9, 0.05, 2)", (key,))
        st.db.commit()
    out = str(tmp_path / "out")
    report.write_report(path, out)
    md = open(os.path.join(out, "report.md")).read()
    assert "## Catastrophic-overfitting guard: flagged epochs" in md and "| yes |" in md
    page = open(os.path.join(out, "report.html")).read()
    assert 'id="guard"' in page and "flagged epochs" in page
    report.write_report(db, str(tmp_path / "plain"))   # no guarded epoch: no section
    assert "Catastrophic-overfitting" not in open(os.path.join(tmp_path / "plain", "report.md")).read()
