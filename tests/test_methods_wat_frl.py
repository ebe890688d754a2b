"""WAT and FRL (frl-rw, frl-rwrm) trained end to end on digits: their per-epoch updates from the
validation split, exact resume, FRL's start from a checkpoint, config errors, and sweeps whose
FRL points start from the grid's TRADES points."""
import json
import math
import subprocess
import sys

import pytest
import torch

from fastfat.config import make_train_config
from fastfat.config_dict import to_dict as config_dict
from fastfat.errors import UserError
from fastfat.methods import build, frl, wat
from fastfat.sweep import grid
from fastfat.train import train

TINY = dict(dataset="digits", model="cnn", width=8, epochs=2, batch_size=64, steps=2, step_size="eps/4",
            eps_train=0.1, lr=0.05, train_limit=256, schedule="constant", device="cpu",
            val_per_class=5, val_attack="pgd2")


@pytest.fixture(scope="module")
def trades_ckpt(tmp_path_factory):
    """A two-epoch TRADES run's checkpoint, for FRL to fine-tune."""
    out = tmp_path_factory.mktemp("trades")
    train(make_train_config(None, **dict(TINY, method="trades")), str(out), progress=False)
    return str(out / "checkpoint.pt")


def test_wat_weights_follow_hedge_on_the_cumulative_validation_cost(tmp_path):
    cfg = make_train_config(None, **dict(TINY, method="wat", wat_eta=0.5))
    _, log = train(cfg, str(tmp_path), progress=False)
    c1, c2 = (torch.tensor(r["wat_val_cost"], dtype=torch.float64) for r in log)
    assert c1.shape == (11,) and (c1 > 0).all()
    # the last entry is the mean over all validation samples: with 5 per class, the class means' mean
    assert math.isclose(float(c1[-1]), float(c1[:10].mean()), rel_tol=1e-6)
    for r, cum in ((log[0], c1), (log[1], c1 + c2)):
        want = 10 * torch.softmax(0.5 * cum, 0)
        assert torch.allclose(torch.tensor(r["wat_weights"], dtype=torch.float64), want, rtol=1e-12, atol=0)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["method"]
    assert torch.equal(state["weights"], torch.tensor(log[1]["wat_weights"], dtype=torch.float64))


def test_wat_first_epoch_trains_on_twice_trades(tmp_path):
    """Their code starts with every weight 1: the first step's loss is twice TRADES' (one batch
    per epoch here, the same start, batch and attack noise)."""
    one = dict(TINY, epochs=1, batch_size=512)
    _, wlog = train(make_train_config(None, **dict(one, method="wat")), str(tmp_path / "w"), progress=False)
    _, tlog = train(make_train_config(None, **dict(one, method="trades")), str(tmp_path / "t"), progress=False)
    assert wlog[0]["loss"] == pytest.approx(2 * tlog[0]["loss"], rel=1e-5)


def test_frl_updates_before_every_epoch_and_remargins(tmp_path, trades_ckpt):
    for method in ("frl-rw", "frl-rwrm"):
        cfg = make_train_config(None, **dict(TINY, method=method, init_from=trades_ckpt))
        assert frl.bounds(cfg) == {"frl-rw": (0.1, 0.1), "frl-rwrm": (0.07, 0.07)}[method]
        _, log = train(cfg, str(tmp_path / method), progress=False)
        assert len(log) == 2 and "frl_lam_nat" in log[0] and "frl_lam_nat" not in log[1]
        lam = torch.tensor(log[0]["frl_lam_nat"] + log[0]["frl_lam_bndy"])
        assert (lam >= 0).all() and lam.sum() > 0
        assert ("frl_eps_factor" in log[0]) == (method == "frl-rwrm")
    # the first update is made from the starting weights, before epoch 1 trains
    cfg = make_train_config(None, **dict(TINY, method="frl-rwrm", init_from=trades_ckpt))
    state = build(cfg, 10, "cpu")
    from fastfat import selection
    from fastfat.data.split import split_training_set
    from fastfat.runfiles import build_for_config, load_init_weights
    _, val = split_training_set(cfg)
    model = build_for_config(cfg, torch.device("cpu"))
    model.load_state_dict(load_init_weights(cfg))
    sel = selection.Selector(cfg, val, torch.device("cpu"))
    state.begin(model, sel, 0)
    assert state.lam_margin.abs().sum() > 0
    y = torch.arange(10)
    eps, alpha = state.radii(y)
    # the factors' float64, not rounded to fp32 (attacks.pgd rounds once, to the attack's dtype)
    assert eps.dtype == alpha.dtype == torch.float64
    torch.testing.assert_close(eps, 0.1 * state.factors, rtol=0, atol=0)
    torch.testing.assert_close(alpha, 0.025 * state.factors, rtol=1e-15, atol=0)
    assert float(eps.min()) >= 0.1 * 0.98 - 1e-7 and float(eps.max()) <= 0.3 + 1e-7


@pytest.mark.parametrize("method", ["wat", "frl-rwrm"])
def test_resume_after_a_kill_repeats_the_run_exactly(tmp_path, trades_ckpt, method):
    extra = {"init_from": trades_ckpt} if method.startswith("frl") else {}
    cfg = make_train_config(None, **dict(TINY, method=method, epochs=3, **extra))
    full, log_full = train(cfg, str(tmp_path / "full"), progress=False)

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, str(tmp_path / "cut"), progress=False, on_epoch=stop)
    resumed, log_resumed = train(cfg, str(tmp_path / "cut"), resume=True, progress=False)
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in log]
    assert strip(log_resumed) == strip(log_full)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("overrides,needle", [
    (dict(method="frl-rw"), "frl-rw fine-tunes a trained model: give --init-from"),
    (dict(method="wat", val_per_class=None), "wat updates its class weights from a validation split"),
    (dict(method="frl-rwrm", init_from="x.pt", val_per_class=None), "give --val-per-class"),
    (dict(method="wat", wat_eta=0.0), "wat_eta must be in (0.0, inf)"),
    (dict(method="frl-rw", init_from="x.pt", frl_lim=1.0), "frl_lim must be below 1"),
    (dict(method="frl-rw", init_from="x.pt", frl_bound_nat=1.5), "frl_bound_nat must be in [0.0, 1.0]"),
    (dict(method="frl-rwrm", init_from="x.pt", frl_margin_max=0.5), "frl_margin_max must be in [1.0, inf)"),
    (dict(method="frl-rw", init_from="x.pt", frl_rate_nat=-1), "frl_rate_nat must be in [0.0, inf)"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(UserError) as e:
        make_train_config(None, **dict(TINY, **overrides))
    assert needle in str(e.value)


def test_cli_frl_without_init_from_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastfat", "train", "--method", "frl-rw", "--dataset", "digits",
                        "--val-per-class", "5", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("fastfat: error:"), r.stderr
    assert "--init-from" in lines[0] and not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------
# Sweeps: init_from = "trades"

def _sweep(tmp_path, methods, **train_extra):
    doc = {"db": "r.db", "grid": {"method": methods, "seed": [0, 1]},
           "train": dict({k: v for k, v in TINY.items() if k != "device"}, init_from="trades", **train_extra)}
    return grid.build_sweep(doc, str(tmp_path))


def test_sweep_frl_points_start_from_their_trades_point_and_run_after_it(tmp_path):
    s = _sweep(tmp_path, ["frl-rw", "wat", "trades"])
    got = [(p.train.method, p.train.seed) for p in s.points]
    assert got == [("wat", 0), ("wat", 1), ("trades", 0), ("trades", 1), ("frl-rw", 0), ("frl-rw", 1)]
    by = {(p.train.method, p.train.seed): p for p in s.points}
    for seed in (0, 1):
        src = by[("trades", seed)]
        assert by[("frl-rw", seed)].train.init_from == str(tmp_path / "r_runs" / src.key / "checkpoint.pt")
        assert by[("frl-rw", seed)].depends_on == src.key
        assert by[("wat", seed)].train.init_from is None and src.train.init_from is None
        assert by[("wat", seed)].depends_on is None
    # keys name the source by method, not by where the runs are
    moved = grid.build_sweep({"db": "r.db", "shared_dir": "elsewhere", "grid": {"method": ["frl-rw", "wat", "trades"],
                              "seed": [0, 1]}, "train": dict({k: v for k, v in TINY.items() if k != "device"},
                                                             init_from="trades")}, str(tmp_path))
    assert [p.key for p in moved.points] == [p.key for p in s.points]
    assert moved.points[-1].train.init_from.startswith(str(tmp_path / "elsewhere"))


def test_sweep_frl_without_its_source_in_the_grid_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"init_from = \"trades\" needs a trades point of dataset digits, "
                                        r"model cnn, eps_train 0.1, seed 0 in the grid; add trades"):
        _sweep(tmp_path, ["frl-rw", "wat"])
    with pytest.raises(UserError, match="is itself fine-tuned"):
        grid.build_sweep({"db": "r.db", "grid": {"method": ["frl-rw", "frl-rwrm"]},
                          "train": dict({k: v for k, v in TINY.items() if k != "device"}, init_from="frl-rw")},
                         str(tmp_path))


def test_frl_bounds_default_per_method_and_sweep_points_share_one_setting(tmp_path):
    cfg = make_train_config(None, **dict(TINY, method="frl-rw", init_from="x.pt", frl_bound_bndy=0.2))
    assert frl.bounds(cfg) == (0.1, 0.2) and cfg.frl_bound_nat is None
    # a sweep's points differ only on the grid's axes (and FRL's derived init_from): one setting,
    # so the report averages seeds and compares FRL with its trades base
    s = _sweep(tmp_path, ["trades", "wat", "frl-rw", "frl-rwrm"])
    assert len({grid.setting_of(config_dict(p.train)) for p in s.points}) == 1


def test_frl_validation_counts_from_records():
    recs = [{"class_acc": [0.8, None, 0.5], "class_count": [10, 0, 4]},
            {"class_acc": [0.4, None, 0.25], "class_count": [10, 0, 4]}]
    c, r, n = frl.validation_counts(recs)
    assert c.tolist() == [8.0, 0.0, 2.0] and r.tolist() == [4.0, 0.0, 1.0] and n.tolist() == [10.0, 0.0, 4.0]
    assert wat.initial_weights(2).shape == (3,)


def test_a_local_sweep_trains_trades_then_frl_from_it(tmp_path):
    from fastfat.sweep import runner
    doc = {"db": "r.db", "grid": {"method": ["frl-rw", "trades"]},
           "train": dict({k: v for k, v in TINY.items() if k != "device"}, epochs=1, init_from="trades"),
           "eval": {"attacks": ["fgsm"], "eps_test": [0.1], "test_limit": 32}}
    s = grid.build_sweep(doc, str(tmp_path))
    counts = runner.run_sweep(s, progress=False, report=False)
    assert counts["done"] == 2 and counts["failed"] == 0
    frl_point = s.points[-1]
    assert frl_point.train.method == "frl-rw"
    saved = json.loads((tmp_path / "r_runs" / frl_point.key / "config.json").read_text())
    assert saved["init_from"] == str(tmp_path / "r_runs" / s.points[0].key / "checkpoint.pt")
