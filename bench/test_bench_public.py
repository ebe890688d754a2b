"""The public attacks beside the libraries they replace, on the same model object in eval mode:
fastfat.pgd (which attacks its cached BN-folded copy) against torchattacks.PGD (PGD-20, fp32,
ResNet18, plain NCHW model as a user holds it), and fastfat's AutoAttack (on the folded copy)
against pyautoattack on the plain model, same batch, same seed. Each pair's result is checked to
agree, and the fastfat / library time ratio is printed at the end of the session."""
from __future__ import annotations

import pytest
import torch

import fastfat
from fastfat import autoattack
from fastfat.models import build_model
from fastfat.models.fold import attack_copy

from .common import batch

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 20
_MEDIANS: dict[str, dict[str, float]] = {}
_AA_ROBUST: dict[str, dict[str, torch.Tensor]] = {}   # scale -> impl -> robust mask


@pytest.fixture(scope="module", autouse=True)
def ratios(request):
    """At the end of the module, one line per group: the library's median time over fastfat's."""
    yield
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if rep is None or capture is None:
        return
    with capture.global_and_fixture_disabled():   # teardown output is captured otherwise
        for group, t in _MEDIANS.items():
            if len(t) == 2:
                (a, ta), (b, tb) = sorted(t.items())   # "fastfat" sorts first
                rep.write_line(f"{group}: {b} {tb:.3f} s / {a} {ta:.3f} s = {tb / ta:.2f}x")


def _record(benchmark, group: str, impl: str):
    if benchmark.stats is not None:
        _MEDIANS.setdefault(group, {})[impl] = benchmark.stats.stats.median


def _model(width: int) -> torch.nn.Module:
    """ResNet18 in eval mode with BN statistics away from (0, 1), as after training."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


GROUP_PGD = "PGD-20: fastfat.pgd vs torchattacks.PGD, same model"


@pytest.mark.benchmark(group=GROUP_PGD)
@pytest.mark.parametrize("impl", ["fastfat", "torchattacks"])
def test_public_pgd(benchmark, scale, impl):
    torchattacks = pytest.importorskip("torchattacks")
    model = _model(scale.width)
    x, y = batch(scale.batch)
    steps = STEPS if scale.name == "full" else 2

    def start():
        """torchattacks' start is uniform_(-eps, eps) from the global RNG: fastfat gets the same
        draw as U(-1, 1) noise (times eps it is the same numbers), so both run the same attack."""
        torch.manual_seed(1)
        return torch.empty_like(x).uniform_(-1.0, 1.0)

    if impl == "fastfat":
        run = lambda: fastfat.pgd(model, x, y, EPS, ALPHA, steps, noise=start())
    else:
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)

        def run():
            torch.manual_seed(1)
            return atk(x, y)
    x_adv = benchmark.pedantic(run, rounds=scale.rounds, iterations=1, warmup_rounds=1)
    _record(benchmark, GROUP_PGD, impl)
    # same attack, same result: robust accuracy equal up to fp32 rounding (folded BN, layout)
    other = fastfat.pgd(model, x, y, EPS, ALPHA, steps, noise=start(), fold_bn=False) \
        if impl == "fastfat" else run()
    with torch.no_grad():
        acc, acc_other = [(model(a).argmax(1) == y).float().mean().item() for a in (x_adv, other)]
    assert abs(acc - acc_other) <= 2 / len(y), (acc, acc_other)
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    benchmark.extra_info["robust_acc"] = acc


GROUP_AA = "AutoAttack (APGD-CE + APGD-T): fastfat on the folded copy vs pyautoattack"
AA_ITERS = {"full": 10, "small": 2}   # per attack (the standard is 100): the per-iteration cost is compared


@pytest.mark.benchmark(group=GROUP_AA)
@pytest.mark.parametrize("impl", ["fastfat", "pyautoattack"])
def test_autoattack(benchmark, scale, impl):
    """The apgd ensemble with the standard settings but AA_ITERS iterations per attack, same
    model, batch and seed. The labels are the model's own clean predictions, so every sample is
    attacked (an untrained model is right on ~10%); on this untrained model eps 8/255 fools few,
    so APGD-T runs its 9 targets on most of the batch. fastfat: autoattack.run on the cached
    folded copy (forward and backward split over the shard workers); pyautoattack: its own
    AutoAttack on the plain model, as its README runs it."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model = _model(scale.width)
    x, _ = batch(scale.batch)
    with torch.no_grad():
        y = model(x).argmax(1)
    seed, iters = 3, AA_ITERS[scale.name]
    ours = lambda: autoattack.run(attack_copy(model), x, y, "apgd", EPS, seed, 10, n_iter=iters)[1]
    aa = AutoAttack(model, norm="Linf", eps=EPS, seed=seed, version="custom",
                    attacks=["apgd-ce", "apgd-t"])
    kw = dict(n_iter=iters, norm="Linf", eps=EPS, seed=seed, eot_iter=1, rho=0.75, device="cpu")
    aa.apgd = APGDAttack(model, n_restarts=1, **kw)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_target_classes=9, **kw)
    aa.verbose = False
    theirs = lambda: aa.run_standard_evaluation(x, y, batch_size=len(y))[1]
    # one round: a round of pyautoattack takes minutes at the full scale
    pred = benchmark.pedantic(ours if impl == "fastfat" else theirs, rounds=1, iterations=1,
                              warmup_rounds=0)
    _record(benchmark, GROUP_AA, impl)
    robust = _AA_ROBUST.setdefault(scale.name, {})
    robust[impl] = pred == y
    if len(robust) == 2:   # both sides have run: the same samples robust, up to fp32 rounding
        assert int((robust["fastfat"] != robust["pyautoattack"]).sum()) <= max(1, len(y) // 64)
    benchmark.extra_info["robust_acc"] = (pred == y).float().mean().item()
