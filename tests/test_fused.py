"""Fused grid points: K members trained as one channel-stacked model give each member's unfused
run (fastfat.train.Trainer): weights, BN statistics and losses, per step; fuse and split."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastfat
from fastfat import runtime
from fastfat.attacks import pgd
from fastfat.config import make_train_config
from fastfat.errors import UserError
from fastfat.fused import fuse_models, split_models
from fastfat.fused.train import FusedTrainer, check_fusable
from fastfat.models import build_model, fold_bn
from fastfat.runfiles import build_for_config
from fastfat.train import Trainer

MODELS = ["cnn", "resnet18", "resnet50", "preactresnet18", "wrn-34-10"]
# Three members that differ in everything a member may: method (madry is FAT with lambda 0),
# radius, step rule, lambda, VCAR mode and seed (initial weights, batches, attack noise).
MEMBERS = [dict(method="madry", eps_train=8 / 255, seed=0),
           dict(method="fat-madry", eps_train=4 / 255, lam=1.0, seed=1),
           dict(method="fat-madry", eps_train=2 / 255, lam=0.5, step_size="eps/4", vcar_mode="authors", seed=2)]


def configs(members=MEMBERS, **shared):
    base = dict(dataset="synthetic", model="cnn", width=4, steps=2, step_size="eps/2", lr=0.02,
                device="cpu", schedule="constant")
    return [make_train_config(None, **{**base, **shared, **m}) for m in members]


def batches(k, steps, n=8, size=8, dtype=torch.float64):
    """Each member's own batches: x [n, 3, size, size] channels_last in [0, 1], y [n]."""
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        out.append([(torch.rand(n, 3, size, size, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last),
                     torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)])
    return out


def run_both(cfgs, steps, dtype=torch.float64, poison=None, **kw):
    """(unfused Trainers, FusedTrainer, per-step losses of both) after `steps` steps from the same
    initial weights, batches and attack generators. poison: a member index whose weights are set
    to NaN in both runs before the first step."""
    models = [build_for_config(c, "cpu").to(dtype) for c in cfgs]
    if poison is not None:
        with torch.no_grad():
            for p in models[poison].parameters():
                p.fill_(float("nan"))
    singles = [Trainer(c, copy.deepcopy(m)) for c, m in zip(cfgs, models)]
    fused = FusedTrainer(cfgs, fuse_models(models))
    data = batches(len(cfgs), steps, dtype=dtype, **kw)
    g1 = [torch.Generator().manual_seed(7 + i) for i in range(len(cfgs))]
    g2 = [torch.Generator().manual_seed(7 + i) for i in range(len(cfgs))]
    l1, l2 = [], []
    for s in range(steps):
        l1.append([float(t.train_step(*data[i][s], g1[i]).loss) for i, t in enumerate(singles)])
        x = fused.model.stack([d[s][0] for d in data])
        y = fused.model.stack([d[s][1] for d in data])
        l2.append(fused.train_step(x, y, g2).loss.tolist())
    return singles, fused, l1, l2


def assert_members_equal(singles, fused, rtol, atol=0.0, skip=()):
    for i, (t, m) in enumerate(zip(singles, split_models(fused.model))):
        if i in skip:
            continue
        ref, got = t.model.state_dict(), m.state_dict()
        assert list(ref) == list(got)
        for key, v in ref.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[key], v, rtol=rtol, atol=atol * v.abs().max().item(),
                                           msg=f"member {i} {key}")
            else:
                assert torch.equal(got[key], v), f"member {i} {key}"


# ---------------------------------------------------------------------------------------------
# fuse / split

@pytest.mark.parametrize("name", MODELS)
def test_fused_forward_equals_each_member_and_split_is_exact(name):
    """In float64 the fused forward (train and eval mode), its BN-folded copy and the BN running
    statistics it updates equal each member's to 1e-12; splitting gives the members back bit
    for bit, in their memory layout."""
    ms = []
    for s in range(3):
        torch.manual_seed(s)
        ms.append(build_model(name, 10, width=4).double().to(memory_format=torch.channels_last))
    f = fuse_models(ms)
    for a, b in zip(ms, split_models(f)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb) and va.stride() == vb.stride(), ka
    xs = [torch.rand(5, 3, 8, 8, dtype=torch.float64) for _ in ms]
    for mode in ("train", "eval"):
        for m in ms + [f]:
            m.train(mode == "train")
        with torch.no_grad():
            got, ref = f.unstack(f(f.stack(xs))), [m(x) for m, x in zip(ms, xs)]
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12 * r.abs().max().item())
    for a, b in zip(ms, split_models(f)):   # the running statistics the train forward updated
        for key, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], v, rtol=1e-12, atol=1e-14)
    folded, members = fold_bn(f), [fold_bn(m) for m in ms]
    with torch.no_grad():
        for g, m, x in zip(folded.unstack(folded(f.stack(xs))), members, xs):
            r = m(x)
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12 * r.abs().max().item())


def test_fuse_refuses_different_architectures():
    with pytest.raises(ValueError, match="architecture"):
        fuse_models([build_model("cnn", 10, width=4), build_model("cnn", 10, width=8)])


def test_public_api_example():
    """The docstring example of fastfat.fuse_models: three variants, each its own radius, after
    one fused step equal three separate steps (float64)."""
    assert fastfat.fuse_models is fuse_models and fastfat.split_models is split_models
    torch.manual_seed(0)
    ms = [build_model("cnn", 10, width=4).double() for _ in range(3)]
    fused = fastfat.fuse_models(ms)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    data = batches(3, 1, n=6)
    xs, ys = [d[0][0] for d in data], [d[0][1] for d in data]
    radii = (2 / 255, 4 / 255, 8 / 255)
    x, y = fused.stack(xs), fused.stack(ys)
    eps = fused.stack([torch.full((6,), e, dtype=torch.float64) for e in radii])
    x_adv = fastfat.pgd(fused, x, y, eps, eps / 4, 3, generator=torch.Generator().manual_seed(0))
    fused.train()
    loss = sum(F.cross_entropy(z, yk) for z, yk in zip(fused.unstack(fused(x_adv)), ys))
    opt.zero_grad()
    loss.backward()
    opt.step()
    noise = fused.unstack(fastfat.attacks.start_noise(x, generator=torch.Generator().manual_seed(0)))
    for m, new, xk, yk, e, nk in zip(ms, fastfat.split_models(fused), xs, ys, radii, noise):
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        xa = fastfat.pgd(m, xk, yk, e, e / 4, 3, noise=nk)
        m.train()
        o.zero_grad()
        F.cross_entropy(m(xa), yk).backward()
        o.step()
        for key, v in m.state_dict().items():
            torch.testing.assert_close(new.state_dict()[key], v, rtol=1e-10, atol=1e-12)


def test_attack_keeps_members_together_when_split_over_workers(monkeypatch):
    """pgd slices a fused batch only between runs of K rows (sample_group): two workers and
    one-sample slices give the one-piece result; 9 samples x 3 members does not split evenly."""
    torch.manual_seed(0)
    f = fuse_models([build_model("cnn", 10, width=4).double() for _ in range(3)])
    data = batches(3, 1, n=9)
    x, y = f.stack([d[0][0] for d in data]), f.stack([d[0][1] for d in data])
    eps = f.stack([torch.full((9,), e, dtype=torch.float64) for e in (0.01, 0.02, 0.03)])
    whole = pgd(f, x, y, eps, eps / 4, 2, generator=torch.Generator().manual_seed(1), threads=1)
    monkeypatch.setattr(runtime, "CHUNK_PIXELS", 1)
    split = pgd(f, x, y, eps, eps / 4, 2, generator=torch.Generator().manual_seed(1), threads=2)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="runs of 3"):
        pgd(f, x[:-1], y[:-1], 0.01, 0.01, 1)


# ---------------------------------------------------------------------------------------------
# The fused step equals K unfused steps

@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_float64_steps_equal_unfused_runs(name, fold):
    """Three members (madry / FAT, own radius, step, lambda, VCAR mode, seed): the fused steps
    leave every member with its unfused Trainer's weights, BN statistics and losses to 1e-10 in
    float64. 20 steps with the BN-folded attack copy, 3 without (the same trajectory: only the
    attack's forward differs). ResNet50 at width 4 amplifies last-bit differences about 10x per
    step here: the unfused path against itself (channels_last vs NCHW, float64, these members
    and batches) is 1e-8..1e-6 apart after 5 steps and O(1) after 10-20, so it is pinned over 5
    (fused vs unfused: 3e-11 after 5)."""
    steps = 3 if not fold else (5 if name == "resnet50" else 20)
    cfgs = configs(model=name, fold_bn=fold)
    singles, fused, l1, l2 = run_both(cfgs, steps)
    for a, b in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-10)
    assert_members_equal(singles, fused, rtol=1e-10, atol=1e-10)
    init = build_for_config(cfgs[0], "cpu").double().state_dict()
    moved = singles[0].model.state_dict()
    assert max((moved[k] - v).abs().max() for k, v in init.items() if v.is_floating_point()) > 1e-3


@pytest.mark.parametrize("family", ["fat-trades", "trades", "natural"])
def test_float64_other_families(family):
    """FAT-TRADES members (own beta, lambda, VCAR mode), TRADES (own beta; the KL attack's
    N(0, 1) start from each member's generator) and natural training, 10 steps."""
    members = {"fat-trades": [dict(method="fat-trades", lam=0.0, beta=6.0, seed=0),
                              dict(method="fat-trades", lam=1.0, beta=3.0, eps_train=4 / 255, seed=1),
                              dict(method="fat-trades", lam=0.5, beta=1.0, vcar_mode="authors", seed=2)],
               "trades": [dict(method="trades", beta=6.0, seed=0),
                          dict(method="trades", beta=1.0, eps_train=4 / 255, seed=1)],
               "natural": [dict(method="natural", eps_train=0.0, seed=s) for s in range(2)]}[family]
    singles, fused, l1, l2 = run_both(configs(members), 10)
    for a, b in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-10)
    assert_members_equal(singles, fused, rtol=1e-10, atol=1e-10)


def test_float64_gradient_clipping_is_per_member():
    """--clip-grad-norm clips each member's own gradient norm (over its slices of every
    parameter), as its unfused step does, not the group's: 10 steps, float64, clipping active."""
    cfgs = configs(clip_grad_norm=0.5)
    singles, fused, l1, l2 = run_both(cfgs, 10)
    for a, b in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-10)
    assert_members_equal(singles, fused, rtol=1e-10, atol=1e-10)
    x = fused.model.stack([d[0][0] for d in batches(3, 1)])
    y = fused.model.stack([d[0][1] for d in batches(3, 1)])
    fused.model.train()
    fused.member_losses(x, y, x)[0].sum().backward()
    assert (fused.clip_members(0.5) > 0.5).all()    # the clip acted on every member


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_fp32_first_step(name):
    """fp32: one fused step is each member's unfused step within the tolerance the fast path's
    first step has against the reference (test_train: loss rel 1e-5, weights rtol 1e-4 / atol
    1e-6): grouped convolutions round differently from single ones."""
    singles, fused, l1, l2 = run_both(configs(model=name), 1, dtype=torch.float32)
    assert l2[0] == pytest.approx(l1[0], rel=1e-5)
    assert_members_equal(singles, fused, rtol=1e-4, atol=1e-6)


def test_fp32_one_member_is_the_unfused_run_bit_for_bit():
    """K = 1 has the unfused shapes and code path (one group, nn.Linear's call): in fp32 the
    fused trainer is the unfused one, bit for bit, over 5 steps."""
    singles, fused, l1, l2 = run_both(configs(MEMBERS[1:2], model="resnet18"), 5, dtype=torch.float32)
    assert l1 == l2
    assert_members_equal(singles, fused, rtol=0, atol=0)


def test_a_diverged_member_does_not_touch_the_others():
    """A member whose weights are NaN (its loss too) leaves the others exactly on their unfused
    runs: every fused op keeps members in their own channels."""
    singles, fused, l1, l2 = run_both(configs(), 5, poison=1)
    assert all(math.isnan(step[1]) for step in l2)
    for a, b in zip(l1, l2):
        assert [b[0], b[2]] == pytest.approx([a[0], a[2]], rel=1e-10)
    assert_members_equal(singles, fused, rtol=1e-10, atol=1e-10, skip=(1,))


def test_plan_groups():
    """Compatible points K at a time in grid order; others in groups of their own kind."""
    from fastfat.fused.plan import plan_groups
    cfgs = configs(MEMBERS + [dict(method="trades", seed=5)] + MEMBERS[:2])
    assert plan_groups(cfgs, 2) == [[0, 1], [2, 4], [3], [5]]
    assert plan_groups(cfgs, 1) == [[i] for i in range(6)]
    assert plan_groups(cfgs, 6) == [[0, 1, 2, 4, 5], [3]]
    assert plan_groups(cfgs, "auto") == [[i] for i in range(6)]   # the CPU: fusion does not pay
    with pytest.raises(UserError, match="fuse"):
        plan_groups(cfgs, 0)


def test_fusable_configs():
    check_fusable(configs())
    with pytest.raises(UserError, match="lr differs"):
        check_fusable(configs()[:1] + configs(MEMBERS[1:], lr=0.01))
    with pytest.raises(UserError, match="does not fuse"):
        check_fusable(configs([dict(method="trades"), dict(method="fat-trades")]))
    with pytest.raises(UserError, match="does not fuse"):
        check_fusable(configs([dict(method="madry"), dict(method="fat-trades")]))
    with pytest.raises(UserError, match="fp16"):
        check_fusable(configs(amp="fp16"))


def test_stack_of_one_channel_channels_last_batches():
    """Digits batches (one channel, channels_last, as the loaders yield them) stack and unstack:
    torch.stack keeps such inputs' layout, which a bare view of [N*K, ...] rejected."""
    fused = fuse_models([build_model("cnn", 10, width=4, in_channels=1) for _ in range(2)])
    xs = [torch.rand(5, 8, 8, 1).permute(0, 3, 1, 2) for _ in range(2)]   # strides (64, 1, 8, 1), as augmented
    x = fused.stack(xs)
    assert x.shape == (10, 1, 8, 8) and torch.equal(x[1::2], xs[1])
    assert all(torch.equal(a, b) for a, b in zip(fused.unstack(x), xs))
