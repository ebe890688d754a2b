"""BAT: its loss against hand-computed values, its two stopping points against a plain per-sample
loop in their code's shape (float64), and runs: the CLI with its one-line errors, exact resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat.cli import main as cli_main
from fastfat.config import make_train_config
from fastfat.files import load_checkpoint
from fastfat.methods.bat import bat_loss, kl_to_uniform, stop_points
from fastfat.runfiles import CHECKPOINT

TINY = dict(dataset="digits", model="cnn", width=8, epochs=2, batch_size=64, steps=2, step_size="eps/4",
            eps_train=0.1, lr=0.05, train_limit=256, schedule="constant", device="cpu")


def test_kl_to_uniform_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    want = torch.tensor([0.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)], dtype=torch.float64)
    torch.testing.assert_close(kl_to_uniform(logits), want, rtol=0, atol=1e-15)


def test_bat_loss_by_hand():
    """Two samples, two classes: every term written out from the probabilities."""
    d = dict(dtype=torch.float64)
    lc = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], **d)     # p = (3/4, 1/4), (1/2, 1/2)
    fa = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], **d)     # p = (1/2, 1/2), (1/4, 3/4)
    nat = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], **d)    # p = (3/4, 1/4), (1/2, 1/2)
    y = torch.tensor([0, 1])
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    kl_nat_fa = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)
                 + 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    kl_u = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) * 2 / 2   # lc row 1 and fa row 2
    got = bat_loss(y, lc, fa, nat, beta=6.0, gamma=0.5)
    assert got.item() == pytest.approx(ce + 6.0 * kl_nat_fa + 0.5 * kl_u, rel=1e-14)


def _their_shape(model, x, y, eps, alpha, steps, tau, start):
    """Per sample, the plain loop their stop functions run (Python lists of indices, each rule on
    its own trajectory from the same start): (last clean, first adversarial)."""
    p_nat = F.softmax(model(x), 1).detach()
    out = []
    for rule in ("lc", "fa"):
        res = [None] * len(y)
        cur, prev, control = start.clone(), start.clone(), [tau] * len(y)
        live = list(range(len(y)))
        for _ in range(steps):
            cur = cur.detach().requires_grad_()
            logits = model(cur)
            keep = []
            for i in live:
                if logits[i].argmax() != y[i]:
                    if rule == "lc":
                        res[i] = prev[i].detach().clone()
                        continue
                    if control[i] == 0:
                        res[i] = cur[i].detach().clone()
                        continue
                    control[i] -= 1
                keep.append(i)
            loss = F.kl_div(F.log_softmax(logits, 1), p_nat, reduction="sum")
            g, = torch.autograd.grad(loss, cur)
            prev = cur.detach()
            cur = torch.min(torch.max(prev + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
            live = keep
        for i in live:
            res[i] = cur[i].detach().clone()
        out.append(torch.stack(res))
    return out


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_stop_points_match_a_plain_loop_in_float64(tau):
    """Samples are independent in eval mode, so one batched trajectory gives each rule's point
    exactly: float64, the same ops per sample, so equal bit for bit."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    x = torch.rand(40, 3, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    lc, fa = stop_points(model, x, y, 0.3, 0.07, 6, tau, noise)
    want_lc, want_fa = _their_shape(model, x, y, 0.3, 0.07, 6, tau, (x + 0.001 * noise).clamp(0, 1))
    assert torch.equal(lc, want_lc) and torch.equal(fa, want_fa)
    # the rules do stop at different steps here (the test exercises both branches)
    end = _their_shape(model, x, y, 0.3, 0.07, 6, 100, (x + 0.001 * noise).clamp(0, 1))[1]
    assert not torch.equal(lc, end) and (tau == 100 or not torch.equal(fa, end))


def test_zero_steps_return_the_start():
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    lc, fa = stop_points(model, x, torch.tensor([0, 1, 0, 1]), 0.1, 0.02, 0, 1, None)
    assert torch.equal(lc, x) and torch.equal(fa, x)


def test_resume_continues_exactly(tmp_path, cut_and_resume):
    cfg = make_train_config(None, **dict(TINY, method="bat"))
    full, log_full, resumed, log_resumed = cut_and_resume(cfg)
    assert log_resumed == [dict(r, seconds=s["seconds"], images_per_s=s["images_per_s"])
                           for r, s in zip(log_full, log_resumed)]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert load_checkpoint(str(tmp_path / "cut" / CHECKPOINT))["epoch"] == 1


def test_cli_trains_bat_and_rejects_bad_values(tmp_path, capsys):
    base = ["train", "--dataset", "digits", "--model", "cnn", "--width", "8", "--epochs", "1",
            "--train-limit", "128", "--steps", "2", "--device", "cpu", "--no-progress", "--method", "bat"]
    assert cli_main(base + ["--out", str(tmp_path / "ok"), "--bat-tau", "2", "--bat-gamma", "0.5"]) == 0
    assert "trained bat" in capsys.readouterr().out
    for extra, says in [(["--bat-tau", "-1"], "bat_tau"), (["--bat-gamma", "-0.5"], "bat_gamma")]:
        out = tmp_path / "bad"
        assert cli_main(base + ["--out", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastfat: error: ") and says in err and err.count("\n") == 1, err
        assert not out.exists()


def test_a_step_makes_the_host_wait_for_nothing(syncing_ops):
    """Both stopping rules and the loss run on the device without a host sync (the attack steps
    the whole batch instead of dropping the stopped samples)."""
    from fastfat import methods
    m = methods.build(make_train_config(None, **dict(TINY, method="bat")), 10, "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    m.begin(model, None, 0)
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 10

    def step():
        x_adv = m.attack(model, x, y, None, None)
        m.loss(y, model(x_adv), model(x))[0].backward()

    assert syncing_ops(step) == set()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
