"""CFA and DAFA in runs: the base method bit for bit before they start, exact resume, the FAWA
weights evaluated, one calibrated step against a plain float64 implementation, no host syncs,
the CLI, a sweep's method axis, fused groups refused (the formulas: test_cfa_dafa.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import methods
from fastfat.cli import main as cli_main
from fastfat.errors import UserError
from fastfat.files import load_checkpoint
from fastfat.fused.train import check_fusable, fuse_key
from fastfat.runfiles import CHECKPOINT, load_model
from fastfat.train import train
from test_cfa_dafa import D64, _cfg


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
def test_resume_continues_exactly(tmp_path, cut_and_resume, method, kw):
    """Killed after epoch 1 and resumed, the run ends as the uninterrupted one: CFA's class
    accuracies and FAWA average, DAFA's weights come back from the checkpoint."""
    cfg = _cfg(method, **kw)
    full, log_full, resumed, log_resumed = cut_and_resume(cfg)
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
    from fastfat.data import MemoryLoader, load_dataset
    from fastfat.runfiles import build_for_config
    from fastfat.train import Trainer
    cfg = _cfg(method, cfa_fawa=False, dafa_warmup=1, beta=6.0)
    fast = build_for_config(cfg, "cpu").double()
    ref = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    trainer = Trainer(cfg, fast)
    m = trainer.method_state
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
