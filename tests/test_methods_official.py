"""The peer methods' official behaviours offered as options (issue 23, part 5): BatchNorm in train
mode while the training attack is crafted (--attack-bn train, CFA's Madry attack), Nesterov
momentum (--nesterov, DAFA's code), FRL-RWRM's per-sample radii in the input's dtype and its
batch-max step (--frl-batch-step), and WAT's and FRL's natural-first forward order."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import attacks, methods
from fastfat.config import make_train_config
from fastfat.errors import UserError
from fastfat.fused.train import alone_reason
from fastfat.methods import frl
from fastfat.runfiles import build_for_config
from fastfat.train import Trainer, make_optimizer, train

TINY = dict(dataset="digits", model="cnn", width=8, epochs=1, batch_size=32, steps=3, step_size="eps/4",
            eps_train=0.1, lr=0.05, train_limit=64, schedule="constant", device="cpu", loader="memory")


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()


def _reference_train_mode_pgd(model, x, y, eps, alpha, steps, noise):
    """CFA's attack_pgd in float64: the model in train mode throughout, a uniform start, sign
    steps of the mean CE's input gradient, projection to the ball and [0, 1]."""
    model.train()
    x_adv = (x + noise * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_batch_stats_attack_matches_a_train_mode_loop_and_moves_the_running_statistics():
    x = torch.rand(8, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(8) % 3
    noise = torch.rand_like(x) * 2 - 1
    ref_model, model = _bn_model(), _bn_model()
    want = _reference_train_mode_pgd(ref_model, x, y, 0.1, 0.03, 4, noise)
    model.eval()   # pgd puts it in train mode for the attack and restores eval after
    got = attacks.pgd(model, x, y, 0.1, 0.03, 4, noise=noise, batch_stats=True)
    # float64, the same operations in the same order up to the CE's reduction: only a gradient
    # entry within rounding of 0 could flip a sign, which these inputs do not have
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not model.training
    bn, ref_bn = model[1], ref_model[1]
    assert int(bn.num_batches_tracked) == 4   # one running-statistics update per attack step
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-12)


def test_eval_mode_attack_leaves_the_running_statistics_alone():
    model = _bn_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 6, 6, dtype=torch.float64)
    attacks.pgd(model, x, torch.arange(8) % 3, 0.1, 0.03, 4, fold_bn=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_attack_bn_train_updates_bn_during_the_attack():
    """--attack-bn train: the Trainer attacks its model on batch statistics (each of the 3 steps
    a BN update), the default attacks the eval copy (no update); one training step adds one."""
    counts = {}
    for mode in ("eval", "train"):
        cfg = make_train_config(None, **dict(TINY, method="cfa-madry", cfa_fawa=False, cfa_begin=0.5,
                                             epochs=2, attack_bn=mode))
        model = build_for_config(cfg, torch.device("cpu"))
        t = Trainer(cfg, model)
        x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
        t.method_state.start_epoch(0)
        t.train_step(x, y)
        counts[mode] = int(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)
    assert counts == {"eval": 1, "train": 1 + 3}


def test_attack_bn_train_trains_end_to_end(tmp_path):
    cfg = make_train_config(None, **dict(TINY, method="madry", attack_bn="train"))
    _, log = train(cfg, str(tmp_path), progress=False)
    assert len(log) == 1 and log[0]["loss"] > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(method="natural", attack_bn="train"), "natural training crafts no attack"),
    (dict(method="madry", attack_bn="batch"), "attack_bn: unknown value 'batch'"),
    (dict(method="madry", attack_bn="train", amp="fp16"), "does not run under --amp fp16"),
    (dict(method="madry", nesterov=True, momentum=0.0), "nesterov needs momentum > 0"),
])
def test_option_checks(kw, msg):
    with pytest.raises(UserError, match=msg):
        make_train_config(None, **dict(TINY, **kw))


def test_attack_bn_train_does_not_fuse():
    assert "attack_bn train" in alone_reason(make_train_config(None, **dict(TINY, attack_bn="train")))
    assert alone_reason(make_train_config(None, **TINY)) is None


def test_official_attack_bn_is_recorded_per_method():
    cfa = methods.BY_NAME["cfa-madry"].official_attack_bn
    assert cfa == {"cfa-madry": "train", "cfa-trades": "eval"}
    assert methods.BY_NAME["dafa-madry"].official_attack_bn == "eval"


def test_nesterov_is_off_by_default_and_reaches_sgd():
    off = make_optimizer(make_train_config(None, **TINY), [nn.Parameter(torch.zeros(2))])
    on = make_optimizer(make_train_config(None, **dict(TINY, nesterov=True)), [nn.Parameter(torch.zeros(2))])
    assert off.param_groups[0]["nesterov"] is False and on.param_groups[0]["nesterov"] is True
    # two steps on f(p) = p . c: Nesterov's update is lr * (g + mu * buf), buf = mu * buf + g
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = make_optimizer(make_train_config(None, **dict(TINY, nesterov=True, weight_decay=0.0)), [p])
    for _ in range(2):
        opt.zero_grad()
        (p * c).sum().backward()
        opt.step()
    mu, lr = 0.9, 0.05
    buf1, buf2 = c, mu * c + c
    want = -lr * (c + mu * buf1) - lr * (c + mu * buf2)
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15)


def test_nesterov_flag_on_the_command_line():
    from fastfat.cli import build_parser
    args = build_parser().parse_args(["train", "--out", "r", "--nesterov", "--attack-bn", "train"])
    assert args.nesterov is True and args.attack_bn == "train"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frl_per_sample_radii_keep_the_input_dtype(dtype):
    factors = torch.tensor([1.0, 1.0 / 3.0, 2.9], dtype=dtype)
    y = torch.tensor([2, 0, 1, 1])
    eps = frl.per_sample(factors, y, 0.1)
    assert eps.dtype == dtype
    want = (0.1 * factors.double()).to(dtype)[y]
    assert torch.equal(eps, want)   # one rounding from the float64 product
    if dtype == torch.float64:
        assert float(eps[2]) == 0.1 * (1.0 / 3.0)   # not the fp32 value it was rounded to before


def test_frl_batch_step_is_the_batch_largest():
    class _Cfg:
        frl_batch_step = True
        eps_train = 0.1
    s = frl.FRL.__new__(frl.FRL)
    s.cfg, s.remargin, s.alpha = _Cfg(), True, 0.025
    s.factors = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])   # the batch holds no class-2 sample: its largest factor is 2
    eps, alpha = s.radii(y)
    torch.testing.assert_close(eps, torch.tensor([0.1, 0.2, 0.1, 0.2], dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.full((4,), 0.05, dtype=torch.float64))
    s.cfg.frl_batch_step = False
    _, own = s.radii(y)
    torch.testing.assert_close(own, torch.tensor([0.025, 0.05, 0.025, 0.05], dtype=torch.float64))


def test_wat_runs_the_natural_forward_first():
    """WAT's and FRL's code: the natural forward, then model(x_adv); TRADES keeps FAT's order."""
    order = {}
    for method, extra in (("wat", dict(val_per_class=5)), ("frl-rw", dict(val_per_class=5, init_from="x.pt")),
                          ("trades", {})):
        cfg = make_train_config(None, **dict(TINY, method=method, **extra))
        model = build_for_config(cfg, torch.device("cpu"))
        t = Trainer(cfg, model)
        x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
        x_adv = x + 0.01
        seen = []
        t.forward = lambda inp, seen=seen: seen.append("nat" if inp is x else "adv") or model(inp)
        if method == "wat":
            t.method_state.weights = torch.ones(11, dtype=torch.float64)
        t.loss(x, y, x_adv)
        order[method] = seen
    assert order == {"wat": ["nat", "adv"], "frl-rw": ["nat", "adv"], "trades": ["adv", "nat"]}
