"""CFA and DAFA (fastfat.methods): their formulas against hand-computed values, their config
checks, and short digits runs (base-method equality before they start, exact resume, the FAWA
weights evaluated, the CLI, a sweep's method axis, fused groups refused)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import losses, methods
from fastfat.cli import main as cli_main
from fastfat.config import base_method, make_train_config
from fastfat.errors import UserError
from fastfat.files import load_checkpoint
from fastfat.fused.train import check_fusable, fuse_key
from fastfat.methods.cfa import CFA, calibrated_beta, calibrated_eps, ccr_weights, fawa_update
from fastfat.methods.dafa import DAFA, class_weights
from fastfat.train import CHECKPOINT, load_model, train

D64 = torch.float64


def _cfg(method="cfa-madry", **kw):
    """A digits run of a second or so: the small CNN, 2 epochs, PGD-2."""
    base = dict(method=method, width=8, epochs=2, train_limit=300, steps=2, eps_train=0.1,
                device="cpu", loader="memory", schedule="constant")
    if method.startswith("cfa-"):
        base.update(cfa_begin=1)
        if kw.get("cfa_fawa", True):
            base.update(val_per_class=5, val_attack="pgd2")
    base.update(kw)
    return make_train_config("demo", **base)


# ---------------------------------------------------------------------------------------------
# CFA

def test_ccm_radii_from_the_previous_epochs_class_accuracy():
    """t_y = correct_y / n_y of the epoch's train-mode adversarial predictions; from cfa_begin
    on, class y is attacked at (lambda1 + t_y) * eps with the step unchanged; before, at eps."""
    cfg = _cfg(cfa_begin=1, cfa_lambda1=0.5, cfa_fawa=False)
    m = CFA(cfg, 10, "cpu")
    m.start_epoch(0)
    y = torch.tensor([0, 0, 1, 1, 2])
    assert m.radii(y) == (cfg.eps_train, cfg.alpha())
    # predictions: class 0 one of two right, class 1 both, class 2 none
    pred = torch.tensor([0, 3, 1, 1, 0])
    m.loss(y, F.one_hot(pred, 10).float(), None)
    m.end_epoch(0, nn.Linear(1, 1), {})
    t = [0.5, 1.0, 0.0] + [0.0] * 7
    assert m.train_acc.tolist() == t
    m.start_epoch(1)
    eps, alpha = m.radii(y)
    expect = torch.tensor([(0.5 + t[c]) * cfg.eps_train for c in y.tolist()], dtype=D64)
    assert torch.allclose(eps, expect, rtol=0, atol=1e-15) and alpha == cfg.alpha()
    assert torch.allclose(calibrated_eps(torch.tensor([0.2, 0.5, 1.0], dtype=D64), 0.5, 0.1),
                          torch.tensor([0.07, 0.1, 0.15], dtype=D64), rtol=0, atol=1e-15)


def test_ccr_betas_and_their_trades_loss():
    """beta_y = (lambda2 + t_y) * beta; the loss is CFA's normalised one
    sum_i [(1 - b_i) CE_i + b_i KL_i] / N with b = beta_y / (1 + beta_y), times 1 + beta."""
    t = torch.tensor([0.2, 0.5], dtype=D64)
    betas = calibrated_beta(t, 0.5, 6.0)
    assert torch.allclose(betas, torch.tensor([4.2, 6.0], dtype=D64), rtol=0, atol=1e-14)
    ce_w, kl_w = ccr_weights(betas, 6.0)
    assert torch.allclose(ce_w, torch.tensor([7 / 5.2, 1.0], dtype=D64), rtol=0, atol=1e-14)
    assert torch.allclose(kl_w, torch.tensor([7 * 4.2 / 5.2, 6.0], dtype=D64), rtol=0, atol=1e-14)
    nat = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=D64)
    adv = torch.tensor([[0.5, 1.0, -1.0], [1.0, 0.0, 0.5]], dtype=D64)
    y = torch.tensor([0, 1])
    soft = lambda row: [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
    p, q = [soft(r) for r in nat.tolist()], [soft(r) for r in adv.tolist()]
    ce = [-math.log(p[i][int(y[i])]) for i in range(2)]
    kl = [sum(a * math.log(a / b) for a, b in zip(p[i], q[i])) for i in range(2)]
    b = [4.2 / 5.2, 6 / 7]
    cfa_code = sum((1 - b[i]) * ce[i] / 2 + b[i] * kl[i] / 2 for i in range(2))
    got = losses.weighted_trades_loss(nat, adv, y, ce_w[y], kl_w[y])
    assert abs(float(got) - 7 * cfa_code) < 1e-12
    # beta_y = beta is TRADES
    same = losses.weighted_trades_loss(nat, adv, y, 1.0, 6.0)
    assert abs(float(same) - float(losses.trades_loss(nat, adv, y, 6.0))) < 1e-12


def test_fawa_is_an_ema_gated_by_the_validation_worst_class():
    """Below the threshold nothing changes (and nothing is evaluated instead of the weights);
    the first epoch at or above it copies the weights, later ones average with decay; integer
    buffers are copied."""
    cfg = _cfg(cfa_fawa_decay=0.85, cfa_fawa_threshold=0.2)
    m = CFA(cfg, 10, "cpu")
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    w = model[0].weight
    rows = [(1.0, 0.1), (1.0, 0.2), (3.0, 0.5), (5.0, 0.19)]   # (weight, val_worst_acc)
    expect = [None, 1.0, 0.85 * 1.0 + 0.15 * 3.0, 0.85 * 1.0 + 0.15 * 3.0]
    for epoch, ((value, worst), want) in enumerate(zip(rows, expect)):
        with torch.no_grad():
            w.fill_(value)
        model[1].num_batches_tracked.fill_(epoch)
        m.start_epoch(epoch)
        row = m.end_epoch(epoch, model, {"val_worst_acc": worst})
        if want is None:
            assert m.fawa is None and methods.EVAL_MODEL not in m.state_dict()
        else:
            assert abs(float(m.fawa["0.weight"]) - want) < 1e-6
            assert int(m.fawa["1.num_batches_tracked"]) == min(epoch, 2)
    assert row["fawa_updates"] == 2
    a, b = {"w": torch.tensor([2.0], dtype=D64)}, {"w": torch.tensor([4.0], dtype=D64)}
    assert float(fawa_update(a, b, 0.88)["w"]) == 2.0 * 0.88 + 4.0 * (1 - 0.88)


# ---------------------------------------------------------------------------------------------
# DAFA

def test_dafa_class_weights_by_hand():
    """p_ii < p_jj: W_i += lambda p_ij p_jj; else W_i -= lambda p_ji p_ii (their loop)."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]], dtype=D64)
    # W0 = 1 + .3*.7 + .1*.9; W1 = 1 - .3*.7 + .1*.9; W2 = 1 - .1*.9 - .1*.9
    assert torch.allclose(class_weights(p, 1.0), torch.tensor([1.30, 0.88, 0.82], dtype=D64),
                          rtol=0, atol=1e-15)
    assert torch.allclose(class_weights(p, 2.0), torch.tensor([1.60, 0.76, 0.64], dtype=D64),
                          rtol=0, atol=1e-15)
    # equal diagonals: both take the else branch and lose
    tie = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=D64)
    assert class_weights(tie, 1.0).tolist() == [0.75, 0.75]


def test_dafa_statistics_weights_radii_and_losses():
    """The last warm-up epoch's mean adversarial softmax per class gives the weights; after it,
    class y's radius and step are W_y times eps and alpha, and W_y weights its CE (Madry: the
    adversarial CE; TRADES: the natural CE, beta * KL unweighted)."""
    cfg = _cfg("dafa-madry", dafa_warmup=1, dafa_lambda=1.0)
    m = DAFA(cfg, 3, "cpu")
    m.start_epoch(0)
    assert m.collect
    rows = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]], dtype=D64)
    # two samples of class 0 whose softmax averages to row 0; one each of classes 1 and 2
    probs = torch.stack([rows[0] + torch.tensor([0.1, -0.1, 0.0], dtype=D64),
                         rows[0] - torch.tensor([0.1, -0.1, 0.0], dtype=D64), rows[1], rows[2]])
    y = torch.tensor([0, 0, 1, 2])
    m.loss(y, probs.log().float(), None)
    row = m.end_epoch(0, nn.Linear(1, 1), {})
    assert torch.allclose(m.weights, torch.tensor([1.30, 0.88, 0.82], dtype=D64), atol=1e-6)
    assert row["dafa_weights"] == m.weights.tolist()
    m.start_epoch(1)
    assert not m.collect
    eps, alpha = m.radii(y)
    w = m.weights[y]
    assert torch.equal(eps, w * cfg.eps_train) and torch.equal(alpha, w * cfg.alpha())
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 3.0]], dtype=D64)
    ce = F.cross_entropy(logits, y, reduction="none")
    loss, _ = m.loss(y, logits, None)
    assert abs(float(loss) - float((w * ce).mean())) < 1e-12
    t = DAFA(_cfg("dafa-trades", dafa_warmup=1), 3, "cpu")
    t.load_state_dict(m.state_dict())
    nat = logits.flip(1)
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(logits, 1))).sum(1)
    loss, _ = t.loss(y, logits, nat)
    ce_nat = F.cross_entropy(nat, y, reduction="none")
    assert abs(float(loss) - float((w * ce_nat).mean() + 6.0 * kl.mean())) < 1e-12


# ---------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("overrides, message", [
    (dict(method="cfa-madry", cfa_begin=1), "--val-per-class"),
    (dict(method="cfa-madry", cfa_fawa=False, cfa_begin=2), "cfa_begin 2"),
    (dict(method="dafa-trades", dafa_warmup=2), "dafa_warmup 2"),
    (dict(method="dafa-madry", dafa_warmup=1.5), "whole number of epochs"),
    (dict(method="dafa-madry", dafa_warmup=1, dafa_lambda=-1), "dafa_lambda must be in"),
    (dict(method="madry", cfa_fawa_decay=1.5), "cfa_fawa_decay must be in"),
    (dict(method="madry", cfa_fawa_threshold=-0.1), "cfa_fawa_threshold must be in"),
    (dict(method="madry", cfa_lambda1=float("nan")), "cfa_lambda1"),
])
def test_config_errors(overrides, message):
    base = dict(dataset="digits", model="cnn", epochs=2, device="cpu")
    with pytest.raises(UserError, match=message):
        make_train_config(None, **dict(base, **overrides))


def test_config_defaults_and_names():
    cfg = make_train_config(None, method="cfa-trades", val_per_class=0.02)
    assert (cfg.cfa_lambda1, cfg.cfa_lambda2, cfg.cfa_begin) == (0.5, 0.5, 10)
    assert (cfg.cfa_fawa, cfg.cfa_fawa_decay, cfg.cfa_fawa_threshold) == (True, 0.85, 0.2)
    assert (cfg.dafa_lambda, cfg.dafa_warmup) == (1.0, 70)
    assert [base_method(m) for m in ("cfa-madry", "cfa-trades", "dafa-madry", "dafa-trades")] == \
        ["madry", "trades", "madry", "trades"]
    # a fraction of the epochs
    assert methods.base.epochs_of(0.64, 110) == 70 and methods.base.epochs_of(0.01, 10) == 1


# ---------------------------------------------------------------------------------------------
# Runs

@pytest.mark.parametrize("method, base, kw", [
    ("cfa-madry", "madry", dict(cfa_fawa=False, cfa_begin=1)),
    ("dafa-trades", "trades", dict(dafa_warmup=1)),
])
def test_first_epoch_is_the_base_method_then_it_departs(tmp_path, method, base, kw):
    """Before CFA calibrates (cfa_begin) and before DAFA's weights (dafa_warmup) a run is its
    base method bit for bit (same code path); after, its radii and loss change the numbers."""
    _, peer = train(_cfg(method, **kw), None, progress=False)
    _, ref = train(_cfg(base), None, progress=False)
    assert peer[0]["loss"] == ref[0]["loss"]
    assert peer[1]["loss"] != ref[1]["loss"]


@pytest.mark.parametrize("method, kw", [
    ("cfa-trades", dict(cfa_begin=1, cfa_fawa_threshold=0.0)),
    ("dafa-madry", dict(dafa_warmup=1)),
])
def test_resume_continues_exactly(tmp_path, method, kw):
    """Killed after epoch 1 and resumed, the run ends as the uninterrupted one: CFA's class
    accuracies and FAWA average, DAFA's weights come back from the checkpoint."""
    cfg = _cfg(method, **kw)
    full, log_full = train(cfg, str(tmp_path / "full"), progress=False)

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, str(tmp_path / "cut"), progress=False, on_epoch=stop)
    resumed, log_resumed = train(cfg, str(tmp_path / "cut"), resume=True, progress=False)
    assert log_resumed[1]["loss"] == log_full[1]["loss"]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = (load_checkpoint(str(tmp_path / d / CHECKPOINT))["method"] for d in ("full", "cut"))
    for k in a:
        if isinstance(a[k], dict):
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_cfa_run_is_evaluated_on_its_fawa_weights(tmp_path):
    """checkpoint.pt keeps the trained weights for resume and FAWA's average for evaluation;
    load_model (fastfat eval, sweeps) takes the average."""
    cfg = _cfg("cfa-madry", cfa_fawa_threshold=0.0)
    model, log = train(cfg, str(tmp_path), progress=False)
    assert [r["fawa_updates"] for r in log] == [1, 2]
    state = load_checkpoint(str(tmp_path / CHECKPOINT))
    fawa = state["method"][methods.EVAL_MODEL]
    loaded, _ = load_model(str(tmp_path / CHECKPOINT))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, fawa[k]), k
    assert any(not torch.equal(v, state["model"][k]) for k, v in fawa.items() if v.is_floating_point())
    # never reaching the threshold: no average, the trained weights are evaluated
    cfg = _cfg("cfa-madry", cfa_fawa_threshold=1.0)
    _, log = train(cfg, str(tmp_path / "never"), progress=False)
    assert log[-1]["fawa_updates"] == 0
    loaded, _ = load_model(str(tmp_path / "never" / CHECKPOINT))
    state = load_checkpoint(str(tmp_path / "never" / CHECKPOINT))
    assert all(torch.equal(v, state["model"][k]) for k, v in loaded.state_dict().items())


def test_cli_trains_each_method(tmp_path, capsys):
    base = ["train", "--preset", "demo", "--width", "8", "--epochs", "2", "--train-limit", "200",
            "--steps", "1", "--device", "cpu", "--no-progress"]
    for method, extra in [("cfa-madry", ["--val-per-class", "4", "--val-attack", "pgd1", "--cfa-begin", "1"]),
                          ("cfa-trades", ["--no-cfa-fawa", "--cfa-begin", "1"]),
                          ("dafa-madry", ["--dafa-warmup", "1"]),
                          ("dafa-trades", ["--dafa-warmup", "0.5", "--dafa-lambda", "1.5"])]:
        assert cli_main(base + ["--method", method, "--out", str(tmp_path / method)] + extra) == 0
        assert f"trained {method}" in capsys.readouterr().out
    # a bad combination is one error line, exit 2, before any work
    assert cli_main(base + ["--method", "cfa-madry", "--cfa-begin", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastfat: error: cfa-madry: FAWA") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_a_sweep_takes_them_on_its_method_axis():
    from fastfat.sweep.grid import build_sweep
    doc = {"grid": {"method": ["madry", "cfa-madry", "dafa-madry", "dafa-trades"], "dataset": ["digits"],
                    "model": ["cnn"], "seed": [0, 1]},
           "train": {"epochs": 4, "val_per_class": 5, "cfa_begin": 1, "dafa_warmup": 0.5}}
    sweep = build_sweep(doc, "base", db="x.db")
    methods_seen = sorted({p.train.method for p in sweep.points})
    assert methods_seen == ["cfa-madry", "dafa-madry", "dafa-trades", "madry"]
    assert all(p.train.dafa_warmup == 0.5 for p in sweep.points)


def test_a_fused_sweep_trains_them_alone(tmp_path):
    """`fastfat sweep --fuse 2` on cfa-madry and dafa-madry, two seeds each: every point done,
    each on its own (grouped, they would fail check_fusable), and the stored results of a cfa
    point are its FAWA weights'."""
    import sqlite3
    (tmp_path / "g.toml").write_text(
        'db = "s.db"\nthreads = 1\n[grid]\nmethod = ["cfa-madry", "dafa-madry"]\n'
        'dataset = ["digits"]\nmodel = ["cnn"]\nseed = [0, 1]\n[train]\npreset = "demo"\n'
        'width = 8\nepochs = 2\ntrain_limit = 200\nsteps = 1\nval_per_class = 4\n'
        'val_attack = "pgd1"\ncfa_begin = 1\ndafa_warmup = 1\ncfa_fawa_threshold = 0.0\n'
        '[eval]\nattacks = ["fgsm"]\neps_test = [0.15]\ntest_limit = 100\n')
    assert cli_main(["sweep", str(tmp_path / "g.toml"), "--fuse", "2", "--no-progress"]) == 0
    db = sqlite3.connect(str(tmp_path / "s.db"))
    rows = db.execute("SELECT method, status, run_dir FROM points").fetchall()
    assert sorted(r[:2] for r in rows) == [("cfa-madry", "done")] * 2 + [("dafa-madry", "done")] * 2
    run = next(tmp_path / r[2] for r in rows if r[0] == "cfa-madry")
    fawa = load_checkpoint(str(run / CHECKPOINT))["method"][methods.EVAL_MODEL]
    loaded, _ = load_model(str(run / CHECKPOINT))
    assert all(torch.equal(v, fawa[k]) for k, v in loaded.state_dict().items())


def test_fused_groups_refuse_them():
    """A fused group carries no method state: check_fusable says so (even for one member), and
    plan_groups' key keeps every such point alone."""
    a, b = _cfg("dafa-madry", dafa_warmup=1), _cfg("dafa-madry", dafa_warmup=1, seed=1)
    with pytest.raises(UserError, match="method dafa-madry does not fuse"):
        check_fusable([a])
    with pytest.raises(UserError, match="method cfa-madry does not fuse"):
        check_fusable([_cfg("madry"), _cfg("cfa-madry")])
    assert fuse_key(a) != fuse_key(b)
    check_fusable([_cfg("madry"), _cfg("madry", seed=1)])   # the others still fuse


@pytest.mark.parametrize("method, kw", [("cfa-trades", {}), ("dafa-madry", dict(dafa_warmup=1))])
def test_a_step_makes_the_host_wait_for_nothing(monkeypatch, syncing_ops, method, kw):
    """A step's radii, loss and statistics (calibrated CFA, DAFA while it collects and after)
    call no op that waits for a CUDA device; class_stats as off the CPU (its one-hot sum)."""
    from fastfat.kernels import torch_ops
    monkeypatch.setattr(torch_ops, "class_stats", torch_ops._class_stats_onehot)
    m = methods.build(_cfg(method, cfa_fawa=False, **kw), 10, "cpu")
    y = torch.arange(8) % 10
    logits, nat = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)

    def step():
        m.radii(y)
        m.loss(y, logits, nat)[0].backward()

    for epoch in range(2):
        m.start_epoch(epoch)
        assert syncing_ops(step) == set()
        m.end_epoch(epoch, nn.Linear(1, 1), {})
    assert isinstance(m.radii(y)[0], torch.Tensor)   # the calibrated / weighted epoch was checked


def _ref_pgd(model, x, y, eps, alpha, steps, noise, kl):
    """PGD as CFA's cw_trades_loss (kl: TRADES' KL, start x + 0.001 N(0, 1)) and DAFA's
    madry_loss without its second, uniform step (CE, start in the ball), per-sample eps and
    alpha [N] broadcast over the image."""
    e, a = eps.view(-1, 1, 1, 1), alpha.view(-1, 1, 1, 1)
    model.eval()
    with torch.no_grad():
        p_nat = F.softmax(model(x), 1)
    x_adv = x + 0.001 * noise if kl else (x + noise * e).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        out = model(x_adv)
        obj = nn.KLDivLoss(reduction="sum")(F.log_softmax(out, 1), p_nat) if kl else F.cross_entropy(out, y)
        (g,) = torch.autograd.grad(obj, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + a * g.sign(), x - e), x + e).clamp(0, 1)
    model.train()
    return x_adv.detach()


@pytest.mark.parametrize("method", ["cfa-trades", "dafa-madry"])
def test_a_calibrated_step_matches_a_plain_reference(method):
    """One SGD step of the trainer with CFA's class radii and betas (from set class accuracies)
    or DAFA's weights equals a plain float64 implementation in their code's shape: per-sample
    radii and steps in the attack, CFA's normalised TRADES loss times 1 + beta, DAFA's weighted
    CE (parameters compared; BN running statistics depend on how many forwards each code does)."""
    import copy

    from fastfat.data import MemoryLoader, load_dataset
    from fastfat.train import Trainer, build_for_config
    cfg = _cfg(method, cfa_fawa=False, dafa_warmup=1, beta=6.0)
    fast = build_for_config(cfg, "cpu").double()
    ref = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    trainer = Trainer(cfg, fast)
    m = trainer.method
    classes = torch.arange(10, dtype=D64)
    if method == "cfa-trades":
        m.train_acc = classes / 10
        m.start_epoch(1)
    else:
        m.weights = 0.6 + classes / 10
        m.start_epoch(1)
    x, y = next(iter(MemoryLoader(load_dataset("digits", "data")[0].subset(32), 32, False)))
    x = x.double()
    g_fast, g_ref = (torch.Generator().manual_seed(3) for _ in range(2))
    trainer.train_step(x.contiguous(memory_format=torch.channels_last), y, g_fast)

    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if method == "cfa-trades":
        t = classes[y] / 10
        eps, alpha = (0.5 + t) * cfg.eps_train, torch.full_like(t, cfg.alpha())
        noise = torch.randn(x.shape, generator=g_ref).double()
        x_adv = _ref_pgd(ref, x, y, eps, alpha, cfg.steps, noise, kl=True)
        adv, nat = ref(x_adv), ref(x)
        b = (0.5 + t) * 6 / (1 + (0.5 + t) * 6)
        kl = nn.KLDivLoss(reduction="none")(F.log_softmax(adv, 1), F.softmax(nat, 1)).sum(1)
        ce = F.cross_entropy(nat, y, reduction="none")
        loss = 7 * ((1 - b) * ce / len(y) + b * kl / len(y)).sum()
    else:
        w = 0.6 + classes[y] / 10
        noise = torch.empty(x.shape).uniform_(-1, 1, generator=g_ref).double()
        x_adv = _ref_pgd(ref, x, y, w * cfg.eps_train, w * cfg.alpha(), cfg.steps, noise, kl=False)
        loss = (F.cross_entropy(ref(x_adv), y, reduction="none") * w).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for (k, a), b_ in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12, msg=k)
    assert not torch.equal(next(fast.parameters()), next(build_for_config(cfg, "cpu").double().parameters()))
