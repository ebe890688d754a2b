"""The PGD step kernel (x_adv <- clamp(clamp(x_adv + alpha*sign(g), x_nat-eps, x_nat+eps), 0, 1), in
place, scalar or per-sample alpha/eps) and its op pgd_step with its plan."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fallbacks, torch_ops
from . import triton_launch as L
from .triton_launch import DTYPES, INTERPRETED, PGD_BLOCK, Launch, check_device

@triton.jit
def pgd_step_kernel(xa_ptr, xn_ptr, g_ptr, alpha_ptr, eps_ptr, alpha, eps, numel, group,
                     PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """Flat pass over numel elements; sample index = flat index // group (group = numel / N)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    xa = tl.load(xa_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_SAMPLE:
        n = offs // group
        a = tl.load(alpha_ptr + n, mask=mask, other=0.0)
        e = tl.load(eps_ptr + n, mask=mask, other=0.0)
    else:
        a = alpha
        e = eps
    # a * sign(g) without a multiply; 0 for g = +-0 and, as torch.sign, for g = NaN.
    step = tl.where(g > 0, a, tl.where(g < 0, -a, 0.0))
    out = xa + step
    # propagate_nan=ALL: torch.maximum/minimum/clamp propagate a NaN x_adv/x_nat, the GPU default drops it.
    out = tl.maximum(out, xn - e, propagate_nan=tl.PropagateNan.ALL)
    out = tl.minimum(out, xn + e, propagate_nan=tl.PropagateNan.ALL)
    out = tl.minimum(tl.maximum(out, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                     propagate_nan=tl.PropagateNan.ALL)
    tl.store(xa_ptr + offs, out.to(xa_ptr.dtype.element_ty), mask=mask)



def flat_layout_ok(x_adv, x_nat, grad) -> bool:
    """One dense flat array each, same strides, batch dim outermost (NCHW or channels_last)."""
    if not (x_adv.shape == x_nat.shape == grad.shape and x_adv.stride() == x_nat.stride() == grad.stride()):
        return False
    if x_adv.is_contiguous():
        return True
    return x_adv.dim() == 4 and x_adv.is_contiguous(memory_format=torch.channels_last)


def _pgd_unsupported(x_adv, x_nat, grad) -> str:
    """Why the pgd_step kernel cannot take these tensors ("" if it can)."""
    if x_adv.dtype not in DTYPES:
        return f"dtype {x_adv.dtype} (the kernel takes fp32/fp16/bf16)"
    if x_adv.numel() == 0:
        return "empty input"
    if not flat_layout_ok(x_adv, x_nat, grad):
        return (f"x_adv, x_nat and grad differ in shape or strides, or are not dense NCHW/channels_last "
                f"(strides {x_adv.stride()}, {x_nat.stride()}, {grad.stride()})")
    return ""


def plan_pgd_step(x_adv, x_nat, grad, alpha, eps) -> Launch:
    numel = x_adv.numel()
    per_sample = isinstance(alpha, torch.Tensor) or isinstance(eps, torch.Tensor)
    if per_sample:
        # Both as fp32 [N] (or [1]) vectors; a float partner becomes a 1-element vector.
        # torch.full on the device, not torch.tensor(...).to(device): no host-to-device copy (a
        # sync) per step when one of the two is a float.
        vec = [(v if isinstance(v, torch.Tensor) else torch.full((1,), float(v), device=x_adv.device))
               .to(device=x_adv.device, dtype=torch.float32).reshape(-1).contiguous() for v in (alpha, eps)]
        if any(v.numel() not in (1, x_adv.shape[0]) for v in vec):
            raise ValueError("per-sample alpha/eps must have 1 or N = x_adv.shape[0] elements")
        if vec[0].numel() != vec[1].numel():
            vec = [v.expand(x_adv.shape[0]).contiguous() for v in vec]
        a_ptr, e_ptr = vec
        group = numel // a_ptr.numel()
        a_val = e_val = 0.0
    else:
        a_ptr = e_ptr = x_adv           # unused (PER_SAMPLE is False)
        group, a_val, e_val = 1, float(alpha), float(eps)
    block = PGD_BLOCK[INTERPRETED]
    return Launch(pgd_step_kernel, (triton.cdiv(numel, block),),
                  dict(xa_ptr=x_adv, xn_ptr=x_nat, g_ptr=grad, alpha_ptr=a_ptr, eps_ptr=e_ptr,
                       alpha=a_val, eps=e_val, numel=numel, group=group),
                  dict(PER_SAMPLE=per_sample, BLOCK=block), num_warps=8)


def pgd_step(x_adv, x_nat, grad, alpha, eps):
    """In place x_adv <- clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), 0, 1).

    x_adv, x_nat, grad: same shape, fp32/fp16/bf16, contiguous NCHW or channels_last (no copies);
    alpha, eps: floats or fp32 per-sample tensors [N]. Math in fp32. Returns x_adv.
    """
    why = _pgd_unsupported(x_adv, x_nat, grad)
    if why:
        fallbacks.record("pgd_step", why)
        return torch_ops.pgd_step(x_adv, x_nat, grad, alpha, eps)
    check_device(x_adv)
    L.run_launch(plan_pgd_step(x_adv, x_nat, grad, alpha, eps))
    return x_adv
