"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the plain-torch twins.

Triton builds its language library for the interpreter or the compiler when it is first
imported, so the interpreter needs TRITON_INTERPRET=1 before that. If this pytest process
imported Triton without it (another test module, or no variable set), the tests of this module
are replaced by one test that runs this file in a fresh process with TRITON_INTERPRET=1.
Calls go through the public dispatch (FASTFAT_KERNELS=triton), so the wiring is tested too.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastfat.kernels as K  # noqa: E402
from fastfat.kernels import torch_ops as R  # noqa: E402
from fastfat.kernels import triton_ops as T  # noqa: E402

INTERPRETING = isinstance(tl.sum, InterpretedFunction) and T.INTERPRETED


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTFAT_KERNELS", "triton")
    # Interpreter tiles that still give several programs and a ragged last one at these sizes.
    monkeypatch.setitem(T.PGD_BLOCK, True, 8192)
    monkeypatch.setitem(T.ROW_TILE, True, 16384)


def close(a, b, rtol, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def grad_close(g, ref, dtype):
    """1e-5 of the largest gradient for fp32; one rounding of the stored dtype otherwise."""
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2 ** -7}[dtype]
    close(g.float(), ref.float(), rtol=rtol, atol=rtol * ref.float().abs().max().item())


# ---------------------------------------------------------------------------------------------
# pgd_step
# ---------------------------------------------------------------------------------------------

def pgd_inputs(dtype, channels_last, n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(n, 3, 16, 16, generator=g)
    x_nat[0] = 0.0                                  # pixels at the [0, 1] box edges
    x_nat[1] = 1.0
    eps = 8 / 255
    x_adv = (x_nat + (torch.rand(x_nat.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=g)
    grad[2] = 0.0                                   # sign(0) = 0
    grad[3, 0, :4] = -0.0
    mf = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=mf) for t in (x_adv, x_nat, grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_step_matches_torch(dtype, channels_last, per_sample):
    x_adv, x_nat, grad = pgd_inputs(dtype, channels_last)
    n = x_adv.shape[0]
    if per_sample:   # steps large enough that the eps-ball and the box both clip
        alpha = torch.linspace(0.0, 0.1, n)
        eps = torch.linspace(0.01, 0.05, n)
    else:
        alpha, eps = 6 / 255, 8 / 255
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, alpha, eps)
    launch = T.plan_pgd_step(x_adv, x_nat, grad, alpha, eps)
    assert launch.args["xa_ptr"] is x_adv and launch.args["g_ptr"] is grad   # no copies
    assert launch.grid[0] > 1 and x_adv.numel() % launch.constexprs["BLOCK"] != 0
    ptr = x_adv.data_ptr()
    out = K.pgd_step(x_adv, x_nat, grad, alpha, eps)
    assert out is x_adv and out.data_ptr() == ptr and out.stride() == ref.stride()
    if dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 where torch rounds: at most 1 ulp (values >= 0).
        diff = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs().max().item()
        assert diff <= 1
    else:
        assert torch.equal(out, ref)
    assert not torch.equal(out, x_nat)


def test_pgd_step_mixed_float_and_tensor_and_nan():
    x_adv, x_nat, grad = pgd_inputs(torch.float32, False)
    grad[5, 1, 2, 3] = float("nan")                 # torch.sign(nan) = 0: that pixel does not move
    x_adv[6, 0, 0, 0] = float("nan")                # a NaN input stays NaN (torch.maximum propagates)
    eps = torch.full((x_adv.shape[0],), 8 / 255)
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, 2 / 255, eps)
    before = x_adv[5, 1, 2, 3].item()
    out = K.pgd_step(x_adv, x_nat, grad, 2 / 255, eps)
    assert torch.allclose(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out[5, 1, 2, 3] == before and out[6, 0, 0, 0].isnan() and out.isnan().sum() == 1


def test_pgd_step_tensor_alpha_with_float_eps():
    """A per-sample step with a float radius (the float becomes a 1-element vector on the
    device), and the reverse, equal the twin."""
    for per in ("alpha", "eps"):
        x_adv, x_nat, grad = pgd_inputs(torch.float32, True)
        vec = torch.linspace(0.0, 0.1, x_adv.shape[0])
        alpha, eps = (vec, 8 / 255) if per == "alpha" else (2 / 255, vec)
        ref = R.pgd_step(x_adv.clone(), x_nat, grad, alpha, eps)
        assert torch.equal(K.pgd_step(x_adv, x_nat, grad, alpha, eps), ref), per


def test_pgd_step_mismatched_layouts_fall_back_counted_and_warned():
    x_adv, x_nat, grad = pgd_inputs(torch.float32, True)
    x_nat = x_nat.contiguous()                      # strides differ: the torch twin serves
    assert not T.flat_layout_ok(x_adv, x_nat, grad)
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, 2 / 255, 8 / 255)
    K.reset_fallback_counts()
    T.fallbacks._WARNED.clear()
    with pytest.warns(K.KernelFallbackWarning, match="pgd_step runs on the torch twin.*strides"):
        assert torch.equal(K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # once per reason
        K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255)
    ((key, n),) = K.fallback_counts().items()
    assert key.startswith("pgd_step: x_adv, x_nat and grad differ") and n == 2
    K.reset_fallback_counts()
    K.pgd_step(*pgd_inputs(torch.float32, True), 2 / 255, 8 / 255)
    assert K.fallback_counts() == {}                # Triton served: nothing counted


# ---------------------------------------------------------------------------------------------
# class statistics, CE, VCAR and the FAT loss
# ---------------------------------------------------------------------------------------------

def rows(c):
    """A batch size that spans several interpreter tiles with a ragged last one."""
    return 2500 if c <= 16 else 1000


def logits_labels(n, c, dtype=torch.float32, seed=0, absent=(3, 7)):
    """Logits whose class-wise mean CE differ a lot (a boost of the true logit by class), so that
    VCAR is not a small difference of near-equal numbers; classes in `absent` never occur."""
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([k for k in range(c) if k not in absent])
    y = present[torch.randint(0, len(present), (n,), generator=g)]
    z = torch.randn(n, c, generator=g) * 2
    z[torch.arange(n), y] += (y % 7).float()
    return z.to(dtype), y


@pytest.mark.parametrize("c", [10, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_class_ce_stats_values(c, dtype):
    n = rows(c)
    z, y = logits_labels(n, c, dtype)
    launch, _ = T.plan_ce(z, y, c)
    assert launch.grid[0] > 1 and n % launch.constexprs["BLOCK_N"] != 0
    ce, sums, counts = K.class_ce_stats(z, y, c)
    ce_r, sums_r, counts_r = R.class_ce_stats(z, y, c)
    assert ce.dtype == sums.dtype == counts.dtype == torch.float32
    # 1e-6 relative, down to a floor of a few ulp of log(sum exp) (>= 1 ulp of 1.0 = 1.2e-7):
    # a near-zero CE is log(1 + tiny), where any two summation orders differ by that much.
    close(ce, ce_r, rtol=1e-6, atol=4e-7)
    close(sums, sums_r, rtol=1e-6)
    assert torch.equal(counts, counts_r) and counts[3] == 0 and sums[3] == 0


def test_class_ce_stats_gradient():
    z, y = logits_labels(600, 10)
    gce, gs = torch.randn(600), torch.randn(10)
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    ce, sums, _ = K.class_ce_stats(zt, y, 10)
    ((ce * gce).sum() + (sums * gs).sum()).backward()
    ce, sums, _ = R.class_ce_stats(zr, y, 10)
    ((ce * gce).sum() + (sums * gs).sum()).backward()
    grad_close(zt.grad, zr.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_stats(dtype):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 100, (3001,), generator=g)
    y[y == 42] = 41                                  # an absent class
    v = (torch.rand(3001, generator=g) * 3).to(dtype).requires_grad_()
    sums, counts = K.class_stats(v, y, 100)
    sums_r, counts_r = R.class_stats(v, y, 100)
    close(sums, sums_r, rtol=1e-6)
    assert torch.equal(counts, counts_r) and counts[42] == 0
    up = torch.randn(100)
    (gv,) = torch.autograd.grad((sums * up).sum(), v)
    (gr,) = torch.autograd.grad((sums_r * up).sum(), v)
    assert gv.dtype == dtype and torch.equal(gv, gr)


FAT_CASES = [(10, "paper", False), (10, "authors", False), (100, "paper", False),
             (100, "authors", False), (100, "paper", True), (100, "authors", True)]


@pytest.mark.parametrize("c,mode,superclass", FAT_CASES)
@pytest.mark.parametrize("ce_weight", [1.0, 0.0])
def test_fat_ce_loss_values_and_gradient(c, mode, superclass, ce_weight):
    z, y = logits_labels(rows(c), c, absent=(3, 7) if c == 10 else (3, 7, 55, 56, 57, 58, 59))
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    lam = 0.7
    loss, mean_ce, vcar = K.fat_ce_loss(zt, y, c, lam, mode, superclass, ce_weight)
    loss_r, mean_r, vcar_r = R.fat_ce_loss(zr, y, c, lam, mode, superclass, ce_weight)
    assert not mean_ce.requires_grad and not vcar.requires_grad and vcar.item() > 0
    for a, b in ((loss, loss_r), (mean_ce, mean_r), (vcar, vcar_r)):
        close(a, b, rtol=1e-6)
    (loss * 3.0).backward()
    (loss_r * 3.0).backward()
    grad_close(zt.grad, zr.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fat_ce_loss_low_precision_logits(dtype):
    z, y = logits_labels(700, 100, dtype)
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = K.fat_ce_loss(zt, y, 100, 1.0, "authors", True)
    ref = R.fat_ce_loss(zr, y, 100, 1.0, "authors", True)
    for a, b in zip(out, ref):
        close(a, b, rtol=1e-6)
    out[0].backward()
    ref[0].backward()
    assert zt.grad.dtype == dtype
    grad_close(zt.grad, zr.grad, dtype)


def test_fat_ce_loss_is_deterministic():
    z, y = logits_labels(2000, 100)
    runs = []
    for _ in range(2):
        zt = z.clone().requires_grad_()
        loss, mean_ce, vcar = K.fat_ce_loss(zt, y, 100, 0.5, "paper")
        loss.backward()
        runs.append((loss, mean_ce, vcar, zt.grad, *K.class_ce_stats(z, y, 100)))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# cw_margin and trades_kl
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [10, 100])
@pytest.mark.parametrize("kappa", [50.0, 0.5, 0.0])
def test_cw_margin(c, kappa):
    # Integer logits: ties among the non-target maxima, and margins exactly at 0 when kappa = 0.
    g = torch.Generator().manual_seed(2)
    z = torch.randint(-3, 4, (777, c), generator=g).float()
    y = torch.randint(0, c, (777,), generator=g)
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = K.cw_margin(zt, y, kappa), R.cw_margin(zr, y, kappa)
    assert torch.equal(out, ref)
    up = torch.randn(777, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    grad_close(zt.grad, zr.grad, torch.float32)


def test_cw_margin_nan_like_torch():
    """A NaN logit makes the row NaN as in torch, also among the non-target logits (where
    tl.max alone would drop it); the gradient has torch's NaNs too (amax's backward divides by a
    zero tie count on such a row), and finite rows are untouched."""
    z, y = logits_labels(40, 10)
    y[:3] = 0
    z[0, 5] = float("nan")                          # a non-target logit
    z[1, 0] = float("nan")                          # the target logit
    z[2, 9] = float("nan")                          # a non-target, in the last column
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = K.cw_margin(zt, y, 50.0), R.cw_margin(zr, y, 50.0)
    assert out[:3].isnan().all() and not out[3:].isnan().any()
    close(out, ref, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    close(zt.grad, zr.grad, rtol=0)
    assert zt.grad[0, 1:].isnan().all() and zt.grad[0, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cw_margin_dtypes(dtype):
    z, y = logits_labels(500, 10, dtype)
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = K.cw_margin(zt, y, 2.0), R.cw_margin(zr, y, 2.0)
    close(out, ref, rtol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(zt.grad, zr.grad)


@pytest.mark.parametrize("c", [10, 100])
@pytest.mark.parametrize("need_nat", [True, False])
def test_trades_kl(c, need_nat):
    g = torch.Generator().manual_seed(3)
    zn = torch.randn(900, c, generator=g) * 3
    za = zn + torch.randn(900, c, generator=g) * 0.5
    ta, tn = za.clone().requires_grad_(), zn.clone().requires_grad_(need_nat)
    ra, rn = za.clone().requires_grad_(), zn.clone().requires_grad_(need_nat)
    out, ref = K.trades_kl(ta, tn), R.trades_kl(ra, rn)
    close(out, ref, rtol=1e-5, atol=1e-6)
    up = torch.rand(900, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    grad_close(ta.grad, ra.grad, torch.float32)
    if need_nat:
        grad_close(tn.grad, rn.grad, torch.float32)
    else:
        assert tn.grad is None


def test_trades_kl_bf16():
    g = torch.Generator().manual_seed(4)
    zn = (torch.randn(300, 10, generator=g) * 3).bfloat16()
    za = (zn.float() + torch.randn(300, 10, generator=g)).bfloat16()
    ta, tn = za.clone().requires_grad_(), zn.clone().requires_grad_()
    ra, rn = za.clone().requires_grad_(), zn.clone().requires_grad_()
    out, ref = K.trades_kl(ta, tn), R.trades_kl(ra, rn)
    close(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    grad_close(ta.grad, ra.grad, torch.bfloat16)
    grad_close(tn.grad, rn.grad, torch.bfloat16)


def test_other_dtypes_use_the_torch_twin():
    z, y = logits_labels(50, 10, torch.float64)
    assert torch.equal(K.cw_margin(z, y, 5.0), R.cw_margin(z, y, 5.0))
    assert torch.equal(K.fat_ce_loss(z, y, 10, 0.5)[0], R.fat_ce_loss(z, y, 10, 0.5)[0])


# ---------------------------------------------------------------------------------------------
# outside the interpreter: run this file again in a process that interprets
# ---------------------------------------------------------------------------------------------

if not INTERPRETING:
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        del globals()[_name]

    def test_kernels_in_interpreter_process():
        env = {k: v for k, v in os.environ.items() if k != "FASTFAT_KERNELS"}
        env["TRITON_INTERPRET"] = "1"
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
