"""Kernel dispatch (kernels/__init__.py) and checks of the plain-torch twins against closed forms."""
import os
import subprocess
import sys
import types

import pytest
import torch

import fastfat.kernels as K
from fastfat.kernels import torch_ops as R

CUDA_LIKE = types.SimpleNamespace(is_cuda=True)   # backend() only asks .is_cuda


def test_dispatch_chooses_triton_for_cuda_tensors(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("FASTFAT_KERNELS", raising=False)
    assert K.backend(CUDA_LIKE) == "triton"
    assert K.backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("FASTFAT_KERNELS", "torch")
    assert K.backend(CUDA_LIKE) == "torch"
    monkeypatch.setenv("FASTFAT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FASTFAT_KERNELS"):
        K.backend(CUDA_LIKE)


def test_dispatch_without_triton_falls_back_counted_and_warned_once():
    """A process where `import triton` fails: CUDA tensors go to torch, each such call counted
    and the first warned about with the import error; CPU tensors are no fallback; forcing
    triton says why."""
    code = """
import os, sys, warnings, torch
sys.modules["triton"] = None          # `import triton` now raises ImportError
import fastfat.kernels as K
from types import SimpleNamespace
cuda_like = SimpleNamespace(is_cuda=True)
assert K.backend(cuda_like) == "torch"
x = torch.rand(2, 3, 4, 4); K.pgd_step(x, x.clone(), torch.randn_like(x), 0.1, 0.1)
assert K.fallback_counts() == {}, K.fallback_counts()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(3):
        assert K._impl(cuda_like, "pgd_step") is K.torch_ops
print("warnings:", len(w), "|", w[0].category.__name__, "|", w[0].message)
print("counts:", K.fallback_counts())
os.environ["FASTFAT_KERNELS"] = "torch"
K.reset_fallback_counts(); K._impl(cuda_like, "pgd_step")
assert K.fallback_counts() == {}, "FASTFAT_KERNELS=torch is a choice, not a fallback"
os.environ["FASTFAT_KERNELS"] = "triton"
try:
    K.backend(x)
except RuntimeError as e:
    print("raised:", e)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTFAT_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised: FASTFAT_KERNELS=triton but the Triton kernels cannot be imported" in out.stdout
    assert "warnings: 1 | KernelFallbackWarning | fastfat.kernels: pgd_step runs on the torch twin, not " \
           "Triton: Triton did not import (ModuleNotFoundError: import of triton halted" in out.stdout, out.stdout
    assert "counts: {'pgd_step: Triton did not import (ModuleNotFoundError: import of triton halted; None in " \
           "sys.modules)': 3}" in out.stdout, out.stdout


def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a launch for tensors on another device runs
    under torch.cuda.device(that device); on the current one, the CPU or meta, nothing changes."""
    pytest.importorskip("triton")
    import contextlib
    from fastfat.kernels import triton_ops as T
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = T.device_guard(torch.device("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for dev in (torch.device("cuda:0"), torch.device("cpu"), None):
        assert isinstance(T.device_guard(dev), contextlib.nullcontext)
    x = torch.empty(4, 3, 2, 2, device="meta")
    assert T.launch_device(T.plan_pgd_step(x, x, x, 0.1, 0.1)) == torch.device("meta")


def test_authors_vcar_on_cifar10_is_the_padded_unbiased_variance():
    # 90 zero slots of the authors' 100 make their term (10 s2 + 9 m2) / 99.
    g = torch.Generator().manual_seed(0)
    sums, counts = torch.rand(10, generator=g) * 20, torch.randint(1, 9, (10,), generator=g).float()
    means = sums / counts
    s2, m = means.var(unbiased=False), means.mean()
    v = R.vcar_from_stats(sums, counts, "authors")
    torch.testing.assert_close(v, (10 * s2 + 9 * m ** 2) / 99, rtol=1e-5, atol=0)
    padded = torch.cat([means, torch.zeros(90)])
    torch.testing.assert_close(v, padded.var(), rtol=1e-5, atol=0)


def test_paper_vcar_ignores_absent_classes_and_superclass_folds():
    sums = torch.tensor([2.0, 0.0, 6.0] + [0.0] * 97)
    counts = torch.tensor([1.0, 0.0, 2.0] + [0.0] * 97)
    # present classes 0 and 2 with means 2 and 3: population variance 0.25
    torch.testing.assert_close(R.vcar_from_stats(sums, counts, "paper"), torch.tensor(0.25))
    # superclass: classes 0 -> 4 and 2 -> 14; means / 5 = 0.4 and 0.6 over two present superclasses
    torch.testing.assert_close(R.vcar_from_stats(sums, counts, "paper", superclass=True), torch.tensor(0.01))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True, "alpha only", "eps only"])
def test_pgd_step_is_the_closed_form_bit_for_bit(dtype, channels_last, per_sample):
    """The twin's update (in place for fp32/fp64 storage, via an fp32 result for bf16) equals
    clamp(min(max(x_adv + alpha * sign(grad), x - eps), x + eps), 0, 1) computed out of place in
    fp32, bit for bit, with points on the ball's and the box's edges and zero gradients."""
    g = torch.Generator().manual_seed(0)
    n = 8
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(n, 3, 5, 5, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    eps = torch.linspace(0.02, 0.3, n) if per_sample else 0.1   # (a string counts as True)
    e = eps.view(-1, 1, 1, 1) if per_sample else eps
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * e).clamp(0, 1)
    grad = torch.randn(x.shape, generator=g)
    grad[2] = 0.0
    alpha = eps / 4 if per_sample else 0.03
    a = alpha.view(-1, 1, 1, 1) if per_sample else alpha
    if per_sample == "alpha only":     # a per-sample step with a float radius (and the reverse below)
        eps = e = 0.1
    elif per_sample == "eps only":
        alpha = a = 0.03
    x, x_adv, grad = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, x_adv, grad))
    xn, xa = x.to(torch.promote_types(dtype, torch.float32)), x_adv.to(torch.promote_types(dtype, torch.float32))
    want = torch.minimum(torch.maximum(xa + a * torch.sign(grad.to(xa.dtype)), xn - e), xn + e).clamp(0, 1)
    got = R.pgd_step(x_adv, x, grad, alpha, eps)
    assert got is x_adv and got.is_contiguous(memory_format=fmt)
    assert torch.equal(got, want.to(dtype))
    assert ((got.float() - x.float()).abs() <= 0.3 + 1e-2).all() and got.min() >= 0 and got.max() <= 1


def test_class_stats_off_the_cpu_is_a_sync_free_onehot_sum(syncing_ops):
    """The twin's class_stats for CUDA tensors (run here on CPU tensors): no syncing op, no
    float atomics (a masked reduction), the CPU path's numbers (float64: to rounding; counts
    exact) and its gradient."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (300,), generator=g)
    y[y == 4] = 5                                          # an absent class
    v = (torch.rand(300, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert syncing_ops(R._class_stats_onehot, v, y, 10) == set()
    sums, counts = R._class_stats_onehot(v, y, 10)
    sums_r, counts_r = R.class_stats(v, y, 10)
    torch.testing.assert_close(sums, sums_r, rtol=1e-14, atol=0)
    assert torch.equal(counts, counts_r) and counts[4] == 0
    up = torch.randn(10, generator=g, dtype=torch.float64)
    assert torch.equal(*(torch.autograd.grad((s * up).sum(), v)[0] for s in (sums, sums_r)))


def test_pgd_plan_with_a_float_partner_makes_no_host_copy(monkeypatch):
    """A float alpha with a per-sample eps (or the reverse): the float becomes a 1-element vector
    made on the device (torch.full), not torch.tensor([...]).to(device), a host-to-device copy
    that syncs at every PGD step."""
    pytest.importorskip("triton")
    from fastfat.kernels import triton_ops as T

    def no_host_tensor(*a, **k):
        raise AssertionError("torch.tensor: a host-to-device copy")
    x = torch.empty(8, 3, 4, 4, device="meta")
    vec = torch.empty(8, device="meta")
    monkeypatch.setattr(torch, "tensor", no_host_tensor)
    for alpha, eps in ((0.01, vec), (vec, 0.03)):
        launch = T.plan_pgd_step(x, x, x, alpha, eps)
        assert launch.args["alpha_ptr"].numel() == launch.args["eps_ptr"].numel() == 8


def test_superclass_table_is_built_once_per_mode_and_device(monkeypatch):
    """The CIFAR-100 fine -> coarse table VCAR folds with is a cached tensor per (mode, device):
    rebuilding it is a host-to-device copy (a sync) at every VCAR, twice per training step."""
    sums, counts = torch.rand(100) * 5, torch.randint(1, 4, (100,)).float()
    want = {m: R.vcar_from_stats(sums, counts, m, superclass=True) for m in R.VCAR_MODES}
    assert R._coarse_index("paper", torch.device("cpu")) is R._coarse_index("paper", torch.device("cpu"))

    def no_host_tensor(*a, **k):
        raise AssertionError("torch.tensor: a host-to-device copy")
    monkeypatch.setattr(torch, "tensor", no_host_tensor)
    for m in R.VCAR_MODES:
        assert torch.equal(R.vcar_from_stats(sums, counts, m, superclass=True), want[m])
