"""The compiled Triton kernels on a CUDA GPU against their torch twins (pytest --device cuda).

What neither the interpreter (test_kernels_triton.py, CPU tensors) nor the ahead-of-time compiles
(test_kernels_aot.py, no GPU) can show: the kernels as compiled for this GPU, at the block sizes
the ops launch with, give the twins' numbers: pgd_step bit for bit in every storage dtype (the
GPU rounds fp32 -> bf16/fp16 to nearest, as torch does; the interpreter truncates), including
one call over more than 2^31 elements; CE / class statistics / FAT / C&W / KL forward and
backward over a grid of class counts and batch sizes, within tolerances derived below; the same
bits twice; NaN as torch; no register spills in the compiled code. Every test also checks that
Triton served it (no fallback to a twin was counted).

Skips unless --device cuda on a machine with a GPU. For checking this file's own logic on a
CPU: FASTFAT_CUDA_TESTS_ON_INTERPRETER=1 TRITON_INTERPRET=1 pytest tests/test_kernels_cuda.py
runs it through Triton's interpreter (the >2^31 and register tests skip; bf16 rounding allows
the interpreter's one-ulp truncation).

Tolerances. tl.exp compiles to ex2.approx.f32 of x * log2(e): the product rounds by up to
|x| * log2(e) * 2^-24 and ex2.approx adds up to 2^-22 relative, so exp(x) is off by at most
EXP_ERR(R) = 2^-22 + R * log2(e) * 2^-24 relative for |x| <= R, where R is the spread of a row's
logits (the shifted logits lie in [-R, 0]); about 4e-6 at R = 50 (torch's expf is within an ulp).
A sum of such terms (softmax's denominator) has the same relative error, so a CE = log(sum) -
shifted target is off by about EXP_ERR(R) plus lg2.approx's 2^-22, absolute; softmax entries
by 2 EXP_ERR(R) relative, so gradients by 2 EXP_ERR(R) * max|weight| absolute. Class sums add
n_c per-sample errors. The tests take twice these bounds; C&W has no transcendental and must be
exact.
"""
import math
import os

import pytest
import torch

pytest.importorskip("triton")

import fastfat.kernels as K  # noqa: E402
from fastfat.kernels import torch_ops as R  # noqa: E402
from fastfat.kernels import triton_launch, triton_ops as T  # noqa: E402

pytestmark = pytest.mark.cuda
ON_INTERPRETER = os.environ.get("FASTFAT_CUDA_TESTS_ON_INTERPRETER") == "1"
LOG2E = math.log2(math.e)


def exp_err(spread: float) -> float:
    """Relative error bound of tl.exp (ex2.approx) on [-spread, 0] (module docstring)."""
    return 2 ** -22 + spread * LOG2E * 2 ** -24


@pytest.fixture
def dev(request, monkeypatch):
    """The CUDA device (skips without --device cuda and a GPU), or the CPU under the
    interpreter check; the Triton kernels forced, fallback counts reset, and checked zero after."""
    if ON_INTERPRETER:
        if not T.INTERPRETED:
            pytest.skip("FASTFAT_CUDA_TESTS_ON_INTERPRETER=1 needs TRITON_INTERPRET=1 before triton is imported")
        monkeypatch.setitem(T.PGD_BLOCK, True, 1 << 14)   # several programs and a ragged tail
        d = torch.device("cpu")
    else:
        d = request.getfixturevalue("cuda_only")
        if T.INTERPRETED:
            pytest.skip("TRITON_INTERPRET=1 in this process: these tests need compiled kernels")
    monkeypatch.setenv("FASTFAT_KERNELS", "triton")
    K.reset_fallback_counts()
    yield d
    assert K.fallback_counts() == {}, f"a twin served a Triton test: {K.fallback_counts()}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, for bit-for-bit comparisons that also cover NaN and -0."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, ulp: int = 0):
    """Equal bits; ulp > 0 allows that many units of the last place (the interpreter's bf16)."""
    if ulp == 0:
        assert torch.equal(bits(out), bits(ref)), f"max diff {(out.float() - ref.float()).abs().max()}"
    else:
        assert (bits(out).int() - bits(ref).int()).abs().max() <= ulp


# ---------------------------------------------------------------------------------------------
# pgd_step

def pgd_inputs(n, dtype, channels_last, dev, seed=0, hw=16):
    g = torch.Generator(device=dev).manual_seed(seed)
    x_nat = torch.rand(n, 3, hw, hw, generator=g, device=dev)
    x_nat[0] = 0.0                                  # the [0, 1] box edges
    x_nat[min(1, n - 1)] = 1.0
    eps = 8 / 255
    x_adv = (x_nat + (torch.rand(x_nat.shape, generator=g, device=dev) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=g, device=dev)
    grad[n // 2] = 0.0                              # sign(0) = 0
    mf = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(dtype).contiguous(memory_format=mf) for t in (x_adv, x_nat, grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", ["no", "both", "alpha", "eps"])
@pytest.mark.parametrize("n", [37, 509])
def test_pgd_step_bit_exact(dev, dtype, channels_last, per_sample, n):
    """Bit for bit the twin's update (same fp32 arithmetic, round to nearest on the store), in
    place, the layout kept, at the launch's block size with a ragged last block."""
    x_adv, x_nat, grad = pgd_inputs(n, dtype, channels_last, dev)
    vec = lambda lo, hi: torch.linspace(lo, hi, n, device=dev)
    alpha = vec(0.0, 0.1) if per_sample in ("both", "alpha") else 6 / 255
    eps = vec(0.01, 0.05) if per_sample in ("both", "eps") else 8 / 255
    launch = T.plan_pgd_step(x_adv, x_nat, grad, alpha, eps)
    assert x_adv.numel() % launch.constexprs["BLOCK"] != 0          # a ragged tail
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, alpha, eps)
    ptr = x_adv.data_ptr()
    out = K.pgd_step(x_adv, x_nat, grad, alpha, eps)
    assert out is x_adv and out.data_ptr() == ptr and out.stride() == ref.stride()
    assert_same_bits(out, ref, ulp=1 if ON_INTERPRETER and dtype == torch.bfloat16 else 0)
    assert not torch.equal(out, x_nat)


def test_pgd_step_nan(dev):
    """As torch: a NaN gradient does not move its pixel (sign(NaN) = 0); a NaN x_adv stays NaN."""
    x_adv, x_nat, grad = pgd_inputs(8, torch.float32, True, dev)
    grad[5, 1, 2, 3] = float("nan")
    x_adv[6, 0, 0, 0] = float("nan")
    before = x_adv[5, 1, 2, 3].clone()
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, 2 / 255, 8 / 255)
    out = K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)   # NaN's own bits may differ
    assert out[5, 1, 2, 3] == before and out[6, 0, 0, 0].isnan() and out.isnan().sum() == 1


def test_pgd_step_over_2_31_elements_bf16(dev):
    """One bf16 update over 2^31 + 1024 elements (int64 offsets): bit for bit the twin's, which
    is elementwise, so it is computed slice by slice (its fp32 temporaries would not fit whole)."""
    if ON_INTERPRETER:
        pytest.skip("13 GB of tensors: GPU only")
    n = 2 ** 31 // (3 * 32 * 32) + 1                      # 699051 images, 2147484672 elements
    x_nat = torch.rand(n, 3, 32, 32, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(n, 3, 32, 32, device=dev, dtype=torch.bfloat16)
    x_adv = x_nat.clone()
    assert x_adv.numel() > 2 ** 31
    K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255)
    torch.cuda.synchronize(dev)
    flat = [t.view(-1) for t in (x_adv, x_nat, grad)]
    step = 1 << 28
    for lo in range(0, flat[0].numel(), step):
        sl = slice(lo, lo + step)
        want = R.pgd_step(flat[1][sl].clone(), flat[1][sl], flat[2][sl], 2 / 255, 8 / 255)
        assert torch.equal(bits(flat[0][sl]), bits(want)), f"elements from {lo}"
    assert not torch.equal(x_adv[-1], x_nat[-1])          # the last image (past 2^31) moved


def test_pgd_step_is_deterministic(dev):
    outs = []
    for _ in range(2):
        x_adv, x_nat, grad = pgd_inputs(512, torch.bfloat16, True, dev)
        outs.append(K.pgd_step(x_adv, x_nat, grad, torch.full((512,), 0.01, device=dev), 8 / 255))
    assert torch.equal(bits(outs[0]), bits(outs[1]))


# ---------------------------------------------------------------------------------------------
# Row kernels: CE + class statistics, FAT, C&W, KL

CLASSES = [10, 100, 1000]
ROWS = [1, 17, 128, 1000, 65536]


def logits_labels(n, c, dev, dtype=torch.float32, seed=0, scale=3.0):
    """Logits with class-dependent confidence (so class means differ and VCAR is not a
    cancellation), labels over all classes; the row spread R is about 2 * 4 * scale + 7."""
    g = torch.Generator(device=dev).manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g, device=dev)
    z = torch.randn(n, c, generator=g, device=dev) * scale
    z[torch.arange(n, device=dev), y] += (y % 7).float()
    return z.to(dtype), y


def spread(z: torch.Tensor) -> float:
    z = z.float()
    return float((z.amax(1) - z.amin(1)).max())


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", ROWS)
def test_class_ce_stats_forward_backward(dev, c, n):
    z, y = logits_labels(n, c, dev)
    e = exp_err(spread(z))
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    ce, sums, counts = K.class_ce_stats(zt, y, c)
    ce_r, sums_r, counts_r = R.class_ce_stats(zr, y, c)
    assert ce.dtype == sums.dtype == counts.dtype == torch.float32
    # per sample: EXP_ERR absolute (the log of the sum) + lg2.approx's 2^-22 + an ulp of the CE
    torch.testing.assert_close(ce, ce_r, rtol=2 ** -22, atol=2 * (e + 2 ** -22))
    assert torch.equal(counts, counts_r)
    # class sums: n_c samples' errors add up, and the two summation orders (blocks of rows, then
    # the blocks, against the twin's) each round up to n_c times (the sequential worst case)
    torch.testing.assert_close(sums, sums_r, rtol=2 * 2 ** -24 * float(counts.max()),
                               atol=2 * (e + 2 ** -22) * float(counts.max()))
    g_ce = torch.rand(n, device=dev)
    g_sums = torch.rand(c, device=dev)
    ((ce * g_ce).sum() + (sums * g_sums).sum()).backward()
    ((ce_r * g_ce).sum() + (sums_r * g_sums).sum()).backward()
    w = float((g_ce.max() + g_sums.max()))
    torch.testing.assert_close(zt.grad, zr.grad, rtol=1e-5, atol=4 * e * w)


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", ROWS)
def test_class_stats(dev, c, n):
    g = torch.Generator(device=dev).manual_seed(1)
    y = torch.randint(0, c, (n,), generator=g, device=dev)
    v = (torch.rand(n, generator=g, device=dev) * 3).requires_grad_()
    sums, counts = K.class_stats(v, y, c)
    sums_r, counts_r = R.class_stats(v, y, c)
    # fp32 sums of the same values in different orders: each rounds up to n_c times
    torch.testing.assert_close(sums, sums_r, rtol=2 * 2 ** -24 * float(counts.max()), atol=0)
    assert torch.equal(counts, counts_r)
    up = torch.randn(c, generator=g, device=dev)
    assert torch.equal(torch.autograd.grad((sums * up).sum(), v)[0], torch.autograd.grad((sums_r * up).sum(), v)[0])


@pytest.mark.parametrize("c,mode,superclass", [(10, "paper", False), (100, "authors", True),
                                               (1000, "paper", False), (1000, "authors", False)])
@pytest.mark.parametrize("n", ROWS)
def test_fat_ce_loss_forward_backward(dev, c, mode, superclass, n):
    z, y = logits_labels(n, c, dev)
    e = exp_err(spread(z))
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss, mean_ce, vcar = K.fat_ce_loss(zt, y, c, 0.7, mode, superclass)
    loss_r, mean_r, vcar_r = R.fat_ce_loss(zr, y, c, 0.7, mode, superclass)
    tol = 2 * (e + 2 ** -22)
    torch.testing.assert_close(mean_ce, mean_r, rtol=1e-6, atol=tol)
    # VCAR: a variance of class means each off by tol: its derivative 2 (m - mu) / k bounds it
    torch.testing.assert_close(vcar, vcar_r, rtol=1e-5, atol=4 * tol * float(mean_r) + 1e-7)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=tol + 0.7 * (4 * tol * float(mean_r) + 1e-7))
    (loss * 3.0).backward()
    (loss_r * 3.0).backward()
    scale = float(zr.grad.abs().max())
    torch.testing.assert_close(zt.grad, zr.grad, rtol=1e-4, atol=4 * e * scale + 1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fat_ce_loss_low_precision_logits(dev, dtype):
    """bf16/fp16 logits read as such, math in fp32, the gradient written in the logits' dtype:
    within one rounding of it."""
    z, y = logits_labels(1000, 100, dev, dtype)
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = K.fat_ce_loss(zt, y, 100, 1.0, "authors", True)
    ref = R.fat_ce_loss(zr, y, 100, 1.0, "authors", True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out[0].backward()
    ref[0].backward()
    assert zt.grad.dtype == dtype
    rtol = {torch.float16: 1e-3, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(zt.grad.float(), zr.grad.float(), rtol=rtol,
                               atol=rtol * float(zr.grad.float().abs().max()))


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", ROWS)
def test_cw_margin_exact(dev, c, n):
    """No transcendental: the twin's numbers and gradient exactly, ties included (integer
    logits), margins at 0 (kappa 0)."""
    g = torch.Generator(device=dev).manual_seed(2)
    z = torch.randint(-3, 4, (n, c), generator=g, device=dev).float()
    y = torch.randint(0, c, (n,), generator=g, device=dev)
    for kappa in (50.0, 0.0):
        zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
        out, ref = K.cw_margin(zt, y, kappa), R.cw_margin(zr, y, kappa)
        assert torch.equal(out, ref)
        up = torch.randn(n, generator=g, device=dev)
        (out * up).sum().backward()
        (ref * up).sum().backward()
        torch.testing.assert_close(zt.grad, zr.grad, rtol=1e-6, atol=1e-7)   # tie shares: one division


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", ROWS)
def test_trades_kl_forward_backward(dev, c, n):
    g = torch.Generator(device=dev).manual_seed(3)
    zn = torch.randn(n, c, generator=g, device=dev) * 3
    za = zn + torch.randn(n, c, generator=g, device=dev) * 0.5
    e = exp_err(max(spread(za), spread(zn)))
    ta, tn = za.clone().requires_grad_(), zn.clone().requires_grad_()
    ra, rn = za.clone().requires_grad_(), zn.clone().requires_grad_()
    out, ref = K.trades_kl(ta, tn), R.trades_kl(ra, rn)
    # KL = sum p (lp - la): each log-softmax off by ~(e + 2^-22) absolute, p by 2e relative
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=8 * (e + 2 ** -22))
    up = torch.rand(n, generator=g, device=dev)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    for got, want in ((ta.grad, ra.grad), (tn.grad, rn.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=8 * (e + 2 ** -22) * float(up.max()))


def test_row_kernels_nan_as_torch(dev):
    """A NaN logit: CE NaN for its sample and in its class's sum (other classes finite); C&W NaN
    for its row, also from a non-target logit (tl.max alone drops NaN), gradients with torch's
    NaNs; KL NaN for its row."""
    z, y = logits_labels(64, 10, dev)
    y[:3] = 0
    z[0, 5] = float("nan")                          # non-target
    z[1, 0] = float("nan")                          # target
    ce, sums, _ = K.class_ce_stats(z, y, 10)
    assert ce[:2].isnan().all() and not ce[2:].isnan().any()
    assert sums[0].isnan() and not sums[1:].isnan().any()
    zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = K.cw_margin(zt, y, 50.0), R.cw_margin(zr, y, 50.0)
    assert out[:2].isnan().all() and not out[2:].isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(zt.grad, zr.grad, rtol=0, atol=0, equal_nan=True)
    kl = K.trades_kl(z, torch.zeros_like(z))
    assert kl[:2].isnan().all() and not kl[2:].isnan().any()


def test_fat_loss_and_class_stats_are_deterministic(dev):
    """Two runs, the same bits: partial sums per block reduced in a fixed order, no atomics."""
    z, y = logits_labels(65536, 100, dev)
    v = torch.rand(65536, device=dev)
    runs = []
    for _ in range(2):
        zt = z.clone().requires_grad_()
        loss, mean_ce, vcar = K.fat_ce_loss(zt, y, 100, 0.5, "paper")
        loss.backward()
        runs.append((loss, mean_ce, vcar, zt.grad, *K.class_ce_stats(z, y, 100), *K.class_stats(v, y, 100)))
    for a, b in zip(*runs):
        assert torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------------------------------------
# The launch device and the compiled code

def test_launch_on_a_second_device(dev):
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs there (Triton launches on the
    current device unless told)."""
    if ON_INTERPRETER or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    other = torch.device("cuda", 1 if torch.cuda.current_device() == 0 else 0)
    x_adv, x_nat, grad = pgd_inputs(64, torch.float32, True, other)
    ref = R.pgd_step(x_adv.clone(), x_nat, grad, 2 / 255, 8 / 255)
    assert_same_bits(K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255), ref)
    z, y = logits_labels(1000, 100, other)
    torch.testing.assert_close(K.class_ce_stats(z, y, 100)[0], R.class_ce_stats(z, y, 100)[0], rtol=1e-5, atol=1e-5)


def test_compiled_kernels_do_not_spill(dev, monkeypatch):
    """Every kernel variant the ops launch, as compiled for this GPU: registers and spills read
    off the compiled kernel (the driver's counts, and cuobjdump's stack/local frame)."""
    if ON_INTERPRETER:
        pytest.skip("compiled kernels only")
    from fastfat.kernels import aot
    compiled = {}
    real_run = T.run_launch

    def run(launch):
        k = real_run(launch)
        dtype = next(v.dtype for v in launch.args.values() if isinstance(v, torch.Tensor))
        compiled[(launch.fn.__name__, tuple(sorted(launch.constexprs.items())), str(dtype))] = k
        return k
    monkeypatch.setattr(triton_launch, "run_launch", run)   # where the ops look it up
    for dtype in (torch.float32, torch.bfloat16):
        x_adv, x_nat, grad = pgd_inputs(64, dtype, True, dev)
        K.pgd_step(x_adv, x_nat, grad, 2 / 255, 8 / 255)
        K.pgd_step(x_adv, x_nat, grad, torch.full((64,), 0.01, device=dev), 8 / 255)
        for c in (10, 100, 1000):
            z, y = logits_labels(1000, c, dev, dtype)
            zt = z.clone().requires_grad_()
            K.fat_ce_loss(zt, y, c, 0.5)[0].backward()
            K.class_stats(torch.rand(1000, device=dev, dtype=dtype), y, c)
            za = z.clone().requires_grad_()
            K.cw_margin(za, y).sum().backward()
            zn = z.clone().requires_grad_()
            K.trades_kl(za, zn).sum().backward()
    names = {key[0] for key in compiled}
    assert names == {k.__name__ for k in T.KERNELS}, names
    have_cuobjdump = os.path.exists(aot.cuobjdump())       # shipped in Triton's wheel (3.x)
    for key, k in compiled.items():
        if getattr(k, "n_spills", None) is None:
            k._init_handles()
        assert k.n_spills == 0, (key, k.n_spills)
        assert 0 < k.n_regs <= 255, (key, k.n_regs)
        if have_cuobjdump:
            res = aot.resources(k.asm["cubin"])
            assert res.spills == 0, (key, res)
