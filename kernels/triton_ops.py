"""Triton twins of kernels/torch_ops.py: same signatures, same semantics, fused memory passes.

Kernels:
  _pgd_step_kernel     x_adv <- clamp(clamp(x_adv + alpha*sign(g), x_nat-eps, x_nat+eps), 0, 1), in place.
  _ce_kernel           forward: per-sample CE + per-block class partial sums/counts of logits [N, C];
                       backward: dlogits = (softmax - onehot) * (wrow[i] + wcls[y_i]).
  _class_stats_kernel  per-block class partial sums/counts of values [N].
  _reduce_kernel       partials [G, 2K] -> [2K], summed in a fixed order (no atomics: same bits twice).
  _cw_kernel           C&W margin per sample, and its gradient.
  _kl_kernel           TRADES KL(softmax(nat) || softmax(adv)) per sample, and its gradients.

Every op is split into a *plan* (tensors -> `Launch`: kernel, grid, arguments, constexprs, no
launch) and `_run(launch)`. Plans work on meta tensors, so kernels/aot.py compiles exactly the
signatures these ops launch, for GPUs this machine does not have.

Interpreter: Triton builds its own library (tl.sum, tl.max, ...) for the interpreter or for the
compiler once, when triton is imported, and triton.jit decides when it decorates. So
TRITON_INTERPRET=1 must be set before triton is first imported; one process is either
interpreting (CPU tensors, tests) or compiling (CUDA tensors, ahead-of-time compiles).

Limits (fallbacks to the torch twin, each counted and warned about once, kernels/fallbacks.py):
storage dtypes other than fp32/fp16/bf16; pgd_step when the three tensors do not share one
dense layout with the batch dim outermost; row kernels when C > MAX_CLASSES (one row must fit
one tile: a wider head would need an online softmax over column chunks); empty inputs.
Launches run on the tensors' CUDA device (torch.cuda.device), whatever the current device is.
Labels must lie in [0, C) (torch raises on others; these kernels cannot check without a host sync).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import fallbacks, torch_ops
from .torch_ops import vcar_from_stats

MAX_CLASSES = 8192
# Storage dtypes the kernels take; anything else (fp64 pins tests) goes to the torch twin.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: GPU tiles are sized for registers (checked spill-free by tests/test_kernels_aot.py);
# the interpreter's cost is per program instance, so it gets big tiles.
PGD_BLOCK = {False: 2048, True: 1 << 16}
ROW_TILE = {False: 2048, True: 1 << 16}
NUM_WARPS = 4


@triton.jit
def _pgd_step_kernel(xa_ptr, xn_ptr, g_ptr, alpha_ptr, eps_ptr, alpha, eps, numel, group,
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


@triton.jit
def _ce_kernel(z_ptr, y_ptr, ce_ptr, part_ptr, wrow_ptr, wcls_ptr, dz_ptr,
               N, C, K, stride_z, stride_dz, stride_wrow,
               BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [BLOCK_N] x classes [BLOCK_C] of logits z [N, C] (any float dtype; math in fp32).

    forward:  ce[i] = log(sum_j exp(z_ij - m_i)) - (z_iy - m_i), as torch's log_softmax + nll;
              part[pid, :K] = sum of ce over the block's rows of each class, part[pid, K:] = counts.
    backward: dz[i, j] = (softmax_ij - [j == y_i]) * (wrow[i * stride_wrow] + wcls[y_i]).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    m2 = rmask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.where(m2, z, float("-inf"))
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    hit = cols[None, :] == y[:, None]                     # one-hot of the label; none on padded rows
    zmax = tl.where(rmask, tl.max(z, axis=1), 0.0)         # padded rows: avoid -inf - -inf
    shifted = z - zmax[:, None]
    ez = tl.exp(shifted)                                   # exactly 0 on padded columns
    se = tl.where(rmask, tl.sum(ez, axis=1), 1.0)
    if BACKWARD:
        ok = rmask & (y >= 0) & (y < K)
        w = tl.load(wrow_ptr + rows * stride_wrow, mask=rmask, other=0.0) \
            + tl.load(wcls_ptr + y, mask=ok, other=0.0)
        dz = (ez / se[:, None] - hit.to(tl.float32)) * w[:, None]
        tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
    else:
        zy = tl.sum(tl.where(hit, shifted, 0.0), axis=1)
        ce = tl.where(rmask, tl.log(se) - zy, 0.0)
        tl.store(ce_ptr + rows, ce, mask=rmask)
        kmask = cols < K
        tl.store(part_ptr + pid * 2 * K + cols, tl.sum(tl.where(hit, ce[:, None], 0.0), axis=0), mask=kmask)
        tl.store(part_ptr + pid * 2 * K + K + cols, tl.sum(hit.to(tl.float32), axis=0), mask=kmask)


@triton.jit
def _class_stats_kernel(v_ptr, y_ptr, part_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[pid, :K] = per-class sums of values v [N] over the block's rows, part[pid, K:] = counts."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < N
    v = tl.load(v_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    hit = ks[None, :] == y[:, None]
    kmask = ks < K
    tl.store(part_ptr + pid * 2 * K + ks, tl.sum(tl.where(hit, v[:, None], 0.0), axis=0), mask=kmask)
    tl.store(part_ptr + pid * 2 * K + K + ks, tl.sum(hit.to(tl.float32), axis=0), mask=kmask)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, G, W, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[w] = sum over g of part[g, w], fp32, in one fixed order (deterministic, no atomics)."""
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        m = (gs < G)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(part_ptr + gs[:, None].to(tl.int64) * W + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)


@triton.jit
def _cw_kernel(z_ptr, y_ptr, out_ptr, g_ptr, dz_ptr, N, C, stride_z, stride_dz, stride_g, kappa,
               BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """margin_i = z_iy - max_{j != y_i} z_ij + kappa; forward out_i = -max(margin_i, 0) (fp32).

    backward (as torch's autograd of torch_ops.cw_margin): where margin > 0, dz_iy = -g_i and
    g_i is shared evenly by the tied maxima among j != y_i (amax's rule); 0 elsewhere.
    NaN as torch: a NaN logit makes the row's output NaN; a NaN among j != y_i also makes
    dz_ij NaN for every j != y_i.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    m2 = rmask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.where(m2, z, float("-inf"))
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    hit = cols[None, :] == y[:, None]
    zy = tl.sum(tl.where(hit, z, 0.0), axis=1)
    others = tl.where(hit, float("-inf"), z)
    zo = tl.max(others, axis=1)
    # tl.max drops NaN where torch's amax returns it: a NaN among the others makes the row NaN.
    nan_row = tl.sum((others != others).to(tl.int32), axis=1) > 0
    zo = tl.where(nan_row, float("nan"), zo)
    margin = zy - zo + kappa
    if BACKWARD:
        g = tl.load(g_ptr + rows * stride_g, mask=rmask, other=0.0)
        s = tl.where(margin > 0, g, 0.0)                  # torch's clamp(min=0) passes no gradient at 0
        tie = (others == zo[:, None]) & m2
        cnt = tl.maximum(tl.sum(tie.to(tl.float32), axis=1), 1.0)
        dz = tl.where(hit, -s[:, None], 0.0) + tl.where(tie, (s / cnt)[:, None], 0.0)
        # torch's amax backward on a NaN row divides by a zero tie count: NaN off the target.
        dz = tl.where(hit, dz, tl.where(nan_row[:, None], float("nan"), dz))
        tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
    else:
        out = -tl.maximum(margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + rows, out, mask=rmask)


@triton.jit
def _kl_kernel(za_ptr, zn_ptr, out_ptr, g_ptr, dza_ptr, dzn_ptr, N, C,
               stride_a, stride_n, stride_g, stride_da, stride_dn,
               BACKWARD: tl.constexpr, NEED_NAT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """kl_i = sum_j p_ij (lp_ij - la_ij), lp/la = log_softmax(nat/adv), p = exp(lp).

    backward: dza = g (softmax(adv) - p); dzn = g p (lp - la - kl) (only if NEED_NAT).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    m2 = rmask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    za = tl.load(za_ptr + rows64[:, None] * stride_a + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    zn = tl.load(zn_ptr + rows64[:, None] * stride_n + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    sa = tl.where(m2, za, float("-inf"))
    sa = sa - tl.where(rmask, tl.max(sa, axis=1), 0.0)[:, None]
    la = sa - tl.log(tl.where(rmask, tl.sum(tl.exp(sa), axis=1), 1.0))[:, None]
    sn = tl.where(m2, zn, float("-inf"))
    sn = sn - tl.where(rmask, tl.max(sn, axis=1), 0.0)[:, None]
    lp = sn - tl.log(tl.where(rmask, tl.sum(tl.exp(sn), axis=1), 1.0))[:, None]
    # Padding: -inf log-probs become 0 before any subtraction (no -inf - -inf), p and q become 0.
    la = tl.where(m2, la, 0.0)
    lp = tl.where(m2, lp, 0.0)
    p = tl.where(m2, tl.exp(lp), 0.0)
    d = lp - la
    kl = tl.sum(p * d, axis=1)
    if BACKWARD:
        g = tl.load(g_ptr + rows * stride_g, mask=rmask, other=0.0)
        dza = (tl.where(m2, tl.exp(la), 0.0) - p) * g[:, None]
        tl.store(dza_ptr + rows64[:, None] * stride_da + cols[None, :], dza.to(dza_ptr.dtype.element_ty), mask=m2)
        if NEED_NAT:
            dzn = p * (d - kl[:, None]) * g[:, None]
            tl.store(dzn_ptr + rows64[:, None] * stride_dn + cols[None, :], dzn.to(dzn_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(out_ptr + rows, kl, mask=rmask)


KERNELS = (_pgd_step_kernel, _ce_kernel, _class_stats_kernel, _reduce_kernel, _cw_kernel, _kl_kernel)


# --------------------------------------------------------------------------------------------
# Launch plumbing
# --------------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch: `fn[grid](*args.values(), **constexprs, num_warps=num_warps)`."""
    fn: object
    grid: tuple
    args: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = NUM_WARPS


def _interpreted(fn) -> bool:
    return isinstance(fn, InterpretedFunction)


# Fixed at import (see the module docstring); a mismatch means TRITON_INTERPRET changed in between.
INTERPRETED = _interpreted(_ce_kernel)
_MODE_MISMATCH = INTERPRETED != _interpreted(tl.sum)


def _launch_device(launch: Launch) -> torch.device | None:
    return next((v.device for v in launch.args.values() if isinstance(v, torch.Tensor)), None)


def _device_guard(device: torch.device | None):
    """torch.cuda.device(device) when it is not the current CUDA device (Triton launches on the
    current device and its current stream); a no-op context otherwise."""
    if device is not None and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _run(launch: Launch):
    """Launch on the device of the launch's tensors; returns Triton's compiled kernel."""
    with _device_guard(_launch_device(launch)):
        return launch.fn[launch.grid](*launch.args.values(), **launch.constexprs, num_warps=launch.num_warps)


def _check_device(t: torch.Tensor) -> None:
    """Refuse launches that cannot work, with a message that says why."""
    if _MODE_MISMATCH:
        raise RuntimeError("TRITON_INTERPRET changed between importing triton and fastfat.kernels.triton_ops; "
                           "set it before either is imported")
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError("fastfat.kernels.triton_ops needs CUDA tensors "
                           "(or TRITON_INTERPRET=1, set before importing triton, for CPU tensors)")


def _row_blocks(n_rows: int, width: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): one whole row per tile, about ROW_TILE elements per program."""
    block_c = triton.next_power_of_2(max(width, 2))
    block_n = max(1, min(ROW_TILE[INTERPRETED] // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_n, block_c


def _rows_unsupported(op: str, logits: torch.Tensor, num_classes: int, other: torch.Tensor | None = None) -> bool:
    """Whether the row kernels cannot take logits [N, C] (and `other`, TRADES' natural logits):
    an unsupported dtype, N = 0, or a row wider than one tile. If so, the fallback is recorded."""
    dtypes = [logits.dtype] + ([other.dtype] if other is not None else [])
    why = ""
    if any(d not in DTYPES for d in dtypes):
        why = f"dtype {', '.join(map(str, dtypes))} (the kernels take fp32/fp16/bf16)"
    elif logits.shape[0] == 0:
        why = "empty input"
    elif max(logits.shape[1], num_classes) > MAX_CLASSES:
        why = f"{max(logits.shape[1], num_classes)} classes > MAX_CLASSES = {MAX_CLASSES}"
    if why:
        fallbacks.record(op, why)
    return bool(why)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """[N, C] with unit column stride (the kernels take a row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# pgd_step
# --------------------------------------------------------------------------------------------

def _flat_layout_ok(x_adv, x_nat, grad) -> bool:
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
    if not _flat_layout_ok(x_adv, x_nat, grad):
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
    return Launch(_pgd_step_kernel, (triton.cdiv(numel, block),),
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
    _check_device(x_adv)
    _run(plan_pgd_step(x_adv, x_nat, grad, alpha, eps))
    return x_adv


# --------------------------------------------------------------------------------------------
# class statistics and CE
# --------------------------------------------------------------------------------------------

def plan_reduce(part: torch.Tensor, out: torch.Tensor) -> Launch:
    """part [G, W] fp32 -> out [W] fp32."""
    G, W = part.shape
    block_w = min(triton.next_power_of_2(W), 256)
    block_g = max(1, min(ROW_TILE[INTERPRETED] // block_w, triton.next_power_of_2(G)))
    return Launch(_reduce_kernel, (triton.cdiv(W, block_w),), dict(part_ptr=part, out_ptr=out, G=G, W=W),
                  dict(BLOCK_G=block_g, BLOCK_W=block_w))


def _finish_partials(part: torch.Tensor, K: int):
    """part [G, 2K] -> (sums [K], counts [K]); a single block already holds the totals."""
    if part.shape[0] == 1:
        tot = part[0]
    else:
        tot = torch.empty(2 * K, dtype=torch.float32, device=part.device)
        _run(plan_reduce(part, tot))
    return tot[:K], tot[K:]


def plan_ce(logits, y, num_classes, backward=None) -> tuple[Launch, dict]:
    """Plan _ce_kernel on logits [N, C]. backward = (wrow [1] or [N] fp32, wcls [K] fp32) or None.

    Returns (launch, outputs): forward outputs ce [N], part [G, 2K]; backward output dz [N, C].
    """
    N, C = logits.shape
    K = num_classes
    block_n, block_c = _row_blocks(N, max(C, K))
    G = triton.cdiv(N, block_n)
    dev = logits.device
    if backward is None:
        ce = torch.empty(N, dtype=torch.float32, device=dev)
        part = torch.empty(G, 2 * K, dtype=torch.float32, device=dev)
        wrow = wcls = dz = ce                       # unused pointers in the forward variant
        outs, stride_dz, stride_wrow = dict(ce=ce, part=part), 0, 0
    else:
        wrow, wcls = backward
        dz = torch.empty((N, C), dtype=logits.dtype, device=dev)
        ce = part = wrow                            # unused pointers in the backward variant
        outs, stride_dz, stride_wrow = dict(dz=dz), C, (0 if wrow.numel() == 1 else wrow.stride(0))
    return Launch(_ce_kernel, (G,),
                  dict(z_ptr=logits, y_ptr=y, ce_ptr=ce, part_ptr=part, wrow_ptr=wrow, wcls_ptr=wcls, dz_ptr=dz,
                       N=N, C=C, K=K, stride_z=logits.stride(0), stride_dz=stride_dz, stride_wrow=stride_wrow),
                  dict(BACKWARD=backward is not None, BLOCK_N=block_n, BLOCK_C=block_c)), outs


def _ce_forward(logits, y, K):
    launch, outs = plan_ce(logits, y, K)
    _run(launch)
    sums, counts = _finish_partials(outs["part"], K)
    return outs["ce"], sums, counts


def _ce_backward(logits, y, K, wrow, wcls):
    launch, outs = plan_ce(logits, y, K, backward=(wrow.float(), wcls.float().contiguous()))
    _run(launch)
    return outs["dz"]


def plan_class_stats(values, y, num_classes) -> tuple[Launch, torch.Tensor]:
    N = values.shape[0]
    block_n, block_k = _row_blocks(N, num_classes)
    part = torch.empty(triton.cdiv(N, block_n), 2 * num_classes, dtype=torch.float32, device=values.device)
    return Launch(_class_stats_kernel, (part.shape[0],),
                  dict(v_ptr=values, y_ptr=y, part_ptr=part, N=N, K=num_classes),
                  dict(BLOCK_N=block_n, BLOCK_K=block_k)), part


class _ClassStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, y, num_classes):
        _check_device(values)
        launch, part = plan_class_stats(values.contiguous(), y.contiguous(), num_classes)
        _run(launch)
        sums, counts = _finish_partials(part, num_classes)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(y)
        ctx.values_dtype = values.dtype
        return sums, counts

    @staticmethod
    def backward(ctx, g_sums, g_counts):
        (y,) = ctx.saved_tensors
        # d sums[c] / d values[i] = [y_i == c]: a gather of [N] floats, left to torch.
        return g_sums[y].to(ctx.values_dtype), None, None


def class_stats(values, y, num_classes):
    """values [N] (float), y [N] int64 -> (sums [C] fp32 differentiable in values, counts [C] fp32)."""
    why = (f"dtype {values.dtype} (the kernels take fp32/fp16/bf16)" if values.dtype not in DTYPES else
           "empty input" if values.numel() == 0 else
           f"{num_classes} classes > MAX_CLASSES = {MAX_CLASSES}" if num_classes > MAX_CLASSES else "")
    if why:
        fallbacks.record("class_stats", why)
        return torch_ops.class_stats(values, y, num_classes)
    return _ClassStats.apply(values, y, num_classes)


class _ClassCEStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, num_classes):
        _check_device(logits)
        ce, sums, counts = _ce_forward(logits, y, num_classes)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(logits, y)
        ctx.num_classes = num_classes
        return ce, sums, counts

    @staticmethod
    def backward(ctx, g_ce, g_sums, g_counts):
        logits, y = ctx.saved_tensors
        # Autograd materialises unused grads as zeros; g_ce may be an expanded (stride 0) view,
        # which the kernel reads through its stride without a copy.
        return _ce_backward(logits, y, ctx.num_classes, g_ce, g_sums), None, None


def class_ce_stats(logits, y, num_classes):
    """logits [N, C] (fp32/bf16/fp16), y [N] int64 -> (CE [N], class sums [C], class counts [C]), fp32.

    One pass over logits; ce and sums are differentiable in logits (fused backward kernel).
    """
    if _rows_unsupported("class_ce_stats", logits, num_classes):
        return torch_ops.class_ce_stats(logits, y, num_classes)
    return _ClassCEStats.apply(_rowmajor(logits), y.contiguous(), num_classes)


class _FatCELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, num_classes, lam, mode, superclass, ce_weight):
        _check_device(logits)
        ce, sums, counts = _ce_forward(logits, y, num_classes)
        mean_ce = ce.mean()
        v = vcar_from_stats(sums, counts, mode, superclass)
        loss = ce_weight * mean_ce + lam * v
        ctx.mark_non_differentiable(mean_ce, v)
        ctx.save_for_backward(logits, y, sums, counts)
        ctx.cfg = (num_classes, lam, mode, superclass, ce_weight)
        return loss, mean_ce, v

    @staticmethod
    def backward(ctx, g_loss, g_mean, g_v):
        logits, y, sums, counts = ctx.saved_tensors
        num_classes, lam, mode, superclass, ce_weight = ctx.cfg
        # dVCAR/dsums by autograd on the tiny [C] formula: one source of truth for both modes,
        # absent classes, the 100-slot padding and the superclass fold.
        with torch.enable_grad():
            s = sums.detach().requires_grad_(True)
            (dv,) = torch.autograd.grad(vcar_from_stats(s, counts, mode, superclass), s)
        wrow = ((g_loss * ce_weight) / logits.shape[0]).reshape(1)   # d(ce_weight * mean CE)/d ce_i
        wcls = dv * (g_loss * lam)                                     # lam * dVCAR/d sums[c]
        return _ce_backward(logits, y, num_classes, wrow, wcls), None, None, None, None, None, None


def fat_ce_loss(logits, y, num_classes, lam, mode="paper", superclass=False, ce_weight=1.0):
    """(ce_weight * mean CE + lam * VCAR, mean CE.detach(), VCAR.detach()), all 0-dim fp32.

    logits [N, C] -> one forward kernel (CE + class partials), a fixed-order reduce when the batch
    spans several blocks, VCAR in torch on [C]; backward is one fused kernel writing dlogits.
    """
    if mode not in torch_ops.VCAR_MODES:
        raise ValueError(f"unknown VCAR mode {mode!r}; expected one of {torch_ops.VCAR_MODES}")
    if _rows_unsupported("fat_ce_loss", logits, num_classes):
        return torch_ops.fat_ce_loss(logits, y, num_classes, lam, mode, superclass, ce_weight)
    return _FatCELoss.apply(_rowmajor(logits), y.contiguous(), num_classes, lam, mode, superclass, ce_weight)


# --------------------------------------------------------------------------------------------
# cw_margin and trades_kl
# --------------------------------------------------------------------------------------------

def plan_cw(logits, y, kappa, g=None) -> tuple[Launch, torch.Tensor]:
    """Forward (g None): output [N] fp32. Backward: g [N] fp32 -> output dz like logits."""
    N, C = logits.shape
    block_n, block_c = _row_blocks(N, C)
    if g is None:
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        gp, dz, stride_dz, stride_g = out, out, 0, 0
    else:
        out = dz = torch.empty((N, C), dtype=logits.dtype, device=logits.device)
        gp, stride_dz, stride_g = g, C, g.stride(0)
    return Launch(_cw_kernel, (triton.cdiv(N, block_n),),
                  dict(z_ptr=logits, y_ptr=y, out_ptr=out, g_ptr=gp, dz_ptr=dz, N=N, C=C,
                       stride_z=logits.stride(0), stride_dz=stride_dz, stride_g=stride_g, kappa=float(kappa)),
                  dict(BACKWARD=g is not None, BLOCK_N=block_n, BLOCK_C=block_c)), out


class _CWMargin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, kappa):
        _check_device(logits)
        launch, out = plan_cw(logits, y, kappa)
        _run(launch)
        ctx.save_for_backward(logits, y)
        ctx.kappa = kappa
        return out

    @staticmethod
    def backward(ctx, g):
        logits, y = ctx.saved_tensors
        launch, dz = plan_cw(logits, y, ctx.kappa, g=g.float())
        _run(launch)
        return dz, None, None


def cw_margin(logits, y, kappa=50.0):
    """logits [N, C], y [N] -> -clamp(z_y - max_{j != y} z_j + kappa, min=0), [N] fp32, differentiable."""
    if _rows_unsupported("cw_margin", logits, logits.shape[1]):
        return torch_ops.cw_margin(logits, y, kappa)
    return _CWMargin.apply(_rowmajor(logits), y.contiguous(), kappa)


def plan_kl(logits_adv, logits_nat, g=None, need_nat=False) -> tuple[Launch, dict]:
    """Forward (g None): kl [N] fp32. Backward: g [N] fp32 -> dza (and dzn if need_nat) like the inputs."""
    N, C = logits_adv.shape
    block_n, block_c = _row_blocks(N, C)
    dev = logits_adv.device
    if g is None:
        out = torch.empty(N, dtype=torch.float32, device=dev)
        gp = dza = dzn = out
        outs, strides = dict(kl=out), (0, 0, 0)
    else:
        out, gp = g, g
        dza = torch.empty((N, C), dtype=logits_adv.dtype, device=dev)
        dzn = torch.empty((N, C), dtype=logits_nat.dtype, device=dev) if need_nat else dza
        outs, strides = dict(dza=dza, dzn=dzn if need_nat else None), (g.stride(0), C, C)
    return Launch(_kl_kernel, (triton.cdiv(N, block_n),),
                  dict(za_ptr=logits_adv, zn_ptr=logits_nat, out_ptr=out, g_ptr=gp, dza_ptr=dza, dzn_ptr=dzn,
                       N=N, C=C, stride_a=logits_adv.stride(0), stride_n=logits_nat.stride(0),
                       stride_g=strides[0], stride_da=strides[1], stride_dn=strides[2]),
                  dict(BACKWARD=g is not None, NEED_NAT=bool(need_nat), BLOCK_N=block_n, BLOCK_C=block_c)), outs


class _TradesKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_adv, logits_nat):
        _check_device(logits_adv)
        launch, outs = plan_kl(logits_adv, logits_nat)
        _run(launch)
        ctx.save_for_backward(logits_adv, logits_nat)
        return outs["kl"]

    @staticmethod
    def backward(ctx, g):
        za, zn = ctx.saved_tensors
        need_nat = ctx.needs_input_grad[1]
        launch, outs = plan_kl(za, zn, g=g.float(), need_nat=need_nat)
        _run(launch)
        return outs["dza"], outs["dzn"]


def trades_kl(logits_adv, logits_nat):
    """KL(softmax(nat) || softmax(adv)) per sample: [N, C] x2 -> [N] fp32, differentiable in both."""
    if _rows_unsupported("trades_kl", logits_adv, logits_adv.shape[1], logits_nat):
        return torch_ops.trades_kl(logits_adv, logits_nat)
    return _TradesKL.apply(_rowmajor(logits_adv), _rowmajor(logits_nat))
