"""FAAL, Fair-ARD and ABSLD in runs: exact resume after a kill, the CLI (with its one-line errors),
and a sweep whose FAAL point starts from, and whose distilling points learn from, the grid's
TRADES point (the formulas: test_methods_new_faal.py, test_methods_new_distill.py)."""
from __future__ import annotations

import sqlite3

import pytest
import torch

from fastfat.cli import main as cli_main
from fastfat.config import make_train_config
from fastfat.errors import UserError
from fastfat.files import load_checkpoint
from fastfat.runfiles import CHECKPOINT
from fastfat.train import train

TINY = dict(dataset="digits", model="cnn", width=8, epochs=2, batch_size=64, steps=2, step_size="eps/4",
            eps_train=0.1, lr=0.05, train_limit=256, schedule="constant", device="cpu")


@pytest.fixture(scope="module")
def trades_ckpt(tmp_path_factory):
    """A two-epoch TRADES run's checkpoint: FAAL's start and the distilling methods' teacher."""
    out = tmp_path_factory.mktemp("trades")
    train(make_train_config(None, **dict(TINY, method="trades")), str(out), progress=False)
    return str(out / CHECKPOINT)


def _cfg(method, ckpt, **kw):
    src = dict(init_from=ckpt) if method == "faal" else dict(teacher=ckpt)
    return make_train_config(None, **dict(TINY, method=method, **src, **kw))


@pytest.mark.parametrize("method", ["faal", "fair-ard", "absld"])
def test_resume_continues_exactly(tmp_path, cut_and_resume, trades_ckpt, method):
    """Killed after epoch 1 and resumed, the run ends as the uninterrupted one (Fair-ARD's class
    weights and ABSLD's temperatures come back from the checkpoint)."""
    cfg = _cfg(method, trades_ckpt)
    full, log_full, resumed, log_resumed = cut_and_resume(cfg)
    assert log_resumed == [dict(r, seconds=s["seconds"], images_per_s=s["images_per_s"])
                           for r, s in zip(log_full, log_resumed)]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = (load_checkpoint(str(tmp_path / d / CHECKPOINT))["method"] for d in ("full", "cut"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_faal_at_radius_zero_is_madry_fine_tuning(tmp_path, trades_ckpt):
    """r = 0 leaves the uniform class weights: (C / N) sum_i CE_i / C, Madry's mean CE (not bit
    for bit: a weighted sum against F.cross_entropy's mean, so to float rounding)."""
    _, faal = train(_cfg("faal", trades_ckpt, faal_r=0.0), None, progress=False)
    _, madry = train(make_train_config(None, **dict(TINY, method="madry", init_from=trades_ckpt)),
                     None, progress=False)
    for f, m in zip(faal, madry):
        assert f["loss"] == pytest.approx(m["loss"], rel=1e-5)
    _, tilted = train(_cfg("faal", trades_ckpt), None, progress=False)
    assert tilted[0]["loss"] != pytest.approx(madry[0]["loss"], rel=1e-3)


def test_fair_ard_logs_its_step_counts_and_the_weights_they_give(trades_ckpt):
    from fastfat.methods.fair_ard import class_weights
    _, log = train(_cfg("fair-ard", trades_ckpt), None, progress=False)
    for row in log:
        kappa = torch.tensor(row["fair_ard_kappa"], dtype=torch.float64)
        assert ((kappa >= 0) & (kappa <= TINY["steps"])).all()
        torch.testing.assert_close(torch.tensor(row["fair_ard_weights"], dtype=torch.float64),
                                   class_weights(kappa, 2.0))


def test_absld_temperatures_stay_in_their_range_and_move(trades_ckpt):
    _, log = train(_cfg("absld", trades_ckpt, absld_rate=0.3), None, progress=False)
    t1, t2 = (torch.tensor(r["absld_temp_adv"]) for r in log)
    assert ((t2 >= 0.5) & (t2 <= 5.0)).all() and not torch.equal(t1, t2)
    # the first update moves every class by at most the rate, the hardest by the full rate
    assert (t1 - 1).abs().max() == pytest.approx(0.3)


def test_cli_trains_each_method_and_says_what_is_missing(tmp_path, trades_ckpt, capsys):
    base = ["train", "--dataset", "digits", "--model", "cnn", "--width", "8", "--epochs", "1",
            "--train-limit", "128", "--steps", "1", "--device", "cpu", "--no-progress"]
    for i, (method, extra) in enumerate([("faal", ["--init-from", trades_ckpt, "--faal-r", "0.3"]),
                          ("fair-ard", ["--teacher", trades_ckpt, "--fair-ard-temp", "4"]),
                          ("fair-ard", ["--teacher", trades_ckpt, "--attack-bn", "train"]),
                          ("absld", ["--teacher", trades_ckpt, "--absld-code-temperatures"])]):
        out = tmp_path / f"{method}-{i}"
        assert cli_main(base + ["--method", method, "--out", str(out)] + extra) == 0
        assert f"trained {method}" in capsys.readouterr().out
    for method, extra, says in [("fair-ard", [], "fair-ard distils from a teacher"),
                                ("faal", [], "faal"),
                                ("absld", ["--teacher", trades_ckpt, "--absld-temp-max", "0.1"], "absld_temp_max"),
                                ("faal", ["--init-from", trades_ckpt, "--faal-divergence", "js"], "faal_divergence")]:
        out = tmp_path / f"bad-{method}"
        assert cli_main(base + ["--method", method, "--out", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastfat: error: ") and says in err and err.count("\n") == 1, err
        assert not out.exists()


def test_a_sweep_resolves_teacher_and_init_from_to_the_grids_trades_point(tmp_path):
    from fastfat.sweep.grid import build_sweep
    doc = {"grid": {"method": ["faal", "fair-ard", "absld", "trades"], "dataset": ["digits"],
                    "model": ["cnn"], "seed": [0, 1]},
           "train": {"epochs": 2, "init_from": "trades", "teacher": "trades"}}
    sweep = build_sweep(doc, "base", db=str(tmp_path / "x.db"))
    by = {(p.train.method, p.train.seed): p for p in sweep.points}
    order = [p.key for p in sweep.points]
    for seed in (0, 1):
        src = by[("trades", seed)]
        assert src.train.init_from is None and src.train.teacher is None
        assert by[("faal", seed)].train.init_from.endswith(f"{src.key}/checkpoint.pt")
        assert by[("faal", seed)].train.teacher is None
        for m in ("fair-ard", "absld"):
            p = by[(m, seed)]
            assert p.train.teacher.endswith(f"{src.key}/checkpoint.pt") and p.train.init_from is None
            assert p.depends_on == src.key and order.index(src.key) < order.index(p.key)
    for teacher, says in (("faal", "itself fine-tuned"), ("madry", "needs a madry point")):
        bad = {"grid": dict(doc["grid"], method=["fair-ard", "faal", "trades"]),
               "train": dict(doc["train"], teacher=teacher)}
        with pytest.raises(UserError, match=says):
            build_sweep(bad, "base", db=str(tmp_path / "y.db"))


def test_a_sweep_trains_them_end_to_end(tmp_path):
    (tmp_path / "g.toml").write_text(
        'db = "s.db"\nthreads = 1\n[grid]\nmethod = ["absld", "faal", "fair-ard", "trades"]\n'
        'dataset = ["digits"]\nmodel = ["cnn"]\nseed = [0]\n[train]\n'
        'width = 8\nepochs = 1\ntrain_limit = 128\nsteps = 1\nval_per_class = 4\nval_attack = "pgd1"\n'
        'init_from = "trades"\nteacher = "trades"\n'
        '[eval]\nattacks = ["fgsm"]\neps_test = [0.15]\ntest_limit = 100\n')
    assert cli_main(["sweep", str(tmp_path / "g.toml"), "--no-progress"]) == 0
    rows = sqlite3.connect(str(tmp_path / "s.db")).execute("SELECT method, status FROM points").fetchall()
    assert sorted(rows) == [("absld", "done"), ("faal", "done"), ("fair-ard", "done"), ("trades", "done")]


@pytest.mark.parametrize("name", ["methods", "methods_cifar10"])
def test_the_packaged_methods_grids_start_them_from_their_trades_point(name):
    from fastfat.sweep import grid
    s = grid.build_sweep(*grid.read_sweep_file(None, name))
    trades = {p.train.seed: p.key for p in s.points if p.train.method == "trades"}
    order = [p.key for p in s.points]
    new = [p for p in s.points if p.train.method in ("faal", "fair-ard", "absld")]
    assert len(new) == 3 * len(trades) == 9
    for p in new:
        field = "init_from" if p.train.method == "faal" else "teacher"
        assert getattr(p.train, field).endswith(f"{trades[p.train.seed]}/checkpoint.pt")
        assert p.depends_on == trades[p.train.seed] and order.index(p.depends_on) < order.index(p.key)
    # the other methods ignore both (their points, keys and settings stay as they were)
    assert all(p.train.teacher is None for p in s.points if p.train.method not in ("fair-ard", "absld"))


@pytest.mark.parametrize("method", ["faal", "fair-ard", "absld"])
def test_a_step_makes_the_host_wait_for_nothing(monkeypatch, syncing_ops, method):
    """FAAL's closed-form weights (its search included), Fair-ARD's step counts and ABSLD's soft
    labels and class losses call no op that waits for a CUDA device; class_stats as off the CPU."""
    import torch.nn as nn
    from fastfat import methods
    from fastfat.kernels import torch_ops
    monkeypatch.setattr(torch_ops, "class_stats", torch_ops._class_stats_onehot)
    cfg = make_train_config(None, **dict(TINY, method=method,
                                         **({"init_from": "x"} if method == "faal" else {"teacher": "x"})))
    m = methods.build(cfg, 10, "cpu")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    m.begin(student, None, 0, teacher=nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).requires_grad_(False))
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 10

    def step():
        x_adv = m.attack(student, x, y, None, None)
        x_adv = x if x_adv is None else x_adv
        nat = student(x) if m.natural_forward else None
        m.loss(y, student(x_adv), nat)[0].backward()

    for epoch in range(2):
        m.start_epoch(epoch)
        assert syncing_ops(step) == set()
        m.end_epoch(epoch, student, {"lr": cfg.lr})


def test_any_zoo_model_teaches_and_a_bad_teacher_stops_before_any_work(tmp_path, trades_ckpt, capsys):
    """The teacher need not be the student's architecture (here a wider CNN teaches a narrower
    one); a teacher file that fails its digest is one error line, exit 2, nothing written."""
    wide = tmp_path / "wide"
    train(make_train_config(None, **dict(TINY, method="trades", width=16, epochs=1)), str(wide), progress=False)
    _, log = train(_cfg("fair-ard", str(wide / CHECKPOINT), epochs=1), None, progress=False)
    assert log[0]["loss"] > 0
    bad = tmp_path / "bad.pt"
    state = torch.load(trades_ckpt, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 1   # altered weights, the old digest
    torch.save(state, bad)
    out = tmp_path / "never"
    args = ["train", "--dataset", "digits", "--model", "cnn", "--width", "8", "--epochs", "1",
            "--train-limit", "128", "--steps", "1", "--device", "cpu", "--no-progress",
            "--method", "absld", "--teacher", str(bad), "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "integrity check" in err and err.count("\n") == 1 and not out.exists()
