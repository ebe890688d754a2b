"""The kernels the fast path leans on, against the reference's inline code, on the CPU (the
torch twins serve CPU tensors): the PGD update, and per-sample CE + per-class statistics + VCAR
with its backward. Each group holds the fast dispatch and its reference twin."""
from __future__ import annotations

import pytest
import torch

from fastfat import kernels, reference

from .common import ref_update

EPS, ALPHA = 8 / 255, 0.007


def _attack_state(n: int, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS, generator=g)).clamp(0, 1)
    grad = torch.randn(x.shape, generator=g)
    if channels_last:
        x, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_adv, grad))
    return x, x_adv, grad


@pytest.mark.benchmark(group="pgd_step: one l_inf PGD update, Nx3x32x32")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_pgd_step(benchmark, scale, impl):
    """fast: kernels.pgd_step, in place on a channels_last batch (what the attack loop calls);
    reference: the authors' out-of-place update on NCHW. Same numbers, checked first."""
    x, x_adv, grad = _attack_state(scale.batch, channels_last=(impl == "fast"))
    expect = ref_update(x_adv, x, grad, ALPHA, EPS)
    if impl == "fast":
        got = kernels.pgd_step(x_adv.clone(), x, grad, ALPHA, EPS)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-7)
        benchmark(kernels.pgd_step, x_adv, x, grad, ALPHA, EPS)
    else:
        benchmark(ref_update, x_adv, x, grad, ALPHA, EPS)


@pytest.mark.benchmark(group="pgd_step: per-sample eps and step (evaluation), Nx3x32x32")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_pgd_step_per_sample(benchmark, scale, impl):
    """The evaluation's form: eps and step per sample (two radii in one batch). The reference
    runs one update per radius on its half of the batch, as its one-eps-at-a-time evaluation."""
    x, x_adv, grad = _attack_state(2 * scale.batch, channels_last=(impl == "fast"))
    n = scale.batch
    eps = torch.tensor([16 / 255] * n + [20 / 255] * n)
    alpha = eps / 4
    if impl == "fast":
        benchmark(kernels.pgd_step, x_adv, x, grad, alpha, eps)
    else:
        def per_radius():
            return [ref_update(x_adv[i * n:(i + 1) * n], x[i * n:(i + 1) * n], grad[i * n:(i + 1) * n],
                               e / 4, e) for i, e in enumerate((16 / 255, 20 / 255))]
        benchmark(per_radius)


@pytest.mark.benchmark(group="FAT loss: CE + class stats + VCAR, forward and backward")
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("classes,mode", [(10, "paper"), (100, "authors")])
def test_fat_loss_forward_backward(benchmark, scale, impl, classes, mode):
    """fast: kernels.fat_ce_loss (per-sample CE, per-class sums/counts by index_add, VCAR from the
    stats; no host sync); reference: reference.ref_fat_loss (a Python loop over the classes with
    a host sync each). Forward + gradient wrt the logits; same loss and gradient, checked first."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(scale.batch, classes, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (scale.batch,), generator=g)
    lam = 0.5

    def fast():
        loss = kernels.fat_ce_loss(logits, y, classes, lam, mode)[0]
        return loss, torch.autograd.grad(loss, logits)[0]

    def ref():
        loss = reference.ref_fat_loss(logits, y, classes, lam, mode)
        return loss, torch.autograd.grad(loss, logits)[0]

    (lf, gf), (lr, gr) = fast(), ref()
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-7)
    benchmark(fast if impl == "fast" else ref)
