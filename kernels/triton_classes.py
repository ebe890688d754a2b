"""The class-statistics kernels and their ops: fused per-sample CE with per-class partial sums
and counts (forward and backward), per-class sums of a value, and the fixed-order reduction of
the partials; class_stats, class_ce_stats and fat_ce_loss (CE + lambda * VCAR)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fallbacks, torch_ops
from . import triton_launch as L
from .torch_ops import vcar_from_stats
from .triton_launch import (DTYPES, INTERPRETED, MAX_CLASSES, ROW_TILE, Launch, check_device, row_blocks,
                            rowmajor, rows_unsupported, label_rows)

@triton.jit
def ce_kernel(z_ptr, y_ptr, ce_ptr, part_ptr, wrow_ptr, wcls_ptr, dz_ptr,
               N, C, K, stride_z, stride_dz, stride_wrow,
               BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [BLOCK_N] x classes [BLOCK_C] of logits z [N, C] (any float dtype; math in fp32).

    forward:  ce[i] = log(sum_j exp(z_ij - m_i)) - (z_iy - m_i), as torch's log_softmax + nll;
              part[pid, :K] = sum of ce over the block's rows of each class, part[pid, K:] = counts.
    backward: dz[i, j] = (softmax_ij - [j == y_i]) * (wrow[i * stride_wrow] + wcls[y_i]).
    """
    pid = tl.program_id(0)
    rows, cols, rmask, m2, rows64, z, y, hit = label_rows(z_ptr, y_ptr, N, C, stride_z, BLOCK_N, BLOCK_C)
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
def class_stats_kernel(v_ptr, y_ptr, part_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
def reduce_kernel(part_ptr, out_ptr, G, W, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[w] = sum over g of part[g, w], fp32, in one fixed order (deterministic, no atomics)."""
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        m = (gs < G)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(part_ptr + gs[:, None].to(tl.int64) * W + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)



def plan_reduce(part: torch.Tensor, out: torch.Tensor) -> Launch:
    """part [G, W] fp32 -> out [W] fp32."""
    G, W = part.shape
    block_w = min(triton.next_power_of_2(W), 256)
    block_g = max(1, min(ROW_TILE[INTERPRETED] // block_w, triton.next_power_of_2(G)))
    return Launch(reduce_kernel, (triton.cdiv(W, block_w),), dict(part_ptr=part, out_ptr=out, G=G, W=W),
                  dict(BLOCK_G=block_g, BLOCK_W=block_w))


def _finish_partials(part: torch.Tensor, K: int):
    """part [G, 2K] -> (sums [K], counts [K]); a single block already holds the totals."""
    if part.shape[0] == 1:
        tot = part[0]
    else:
        tot = torch.empty(2 * K, dtype=torch.float32, device=part.device)
        L.run_launch(plan_reduce(part, tot))
    return tot[:K], tot[K:]


def plan_ce(logits, y, num_classes, backward=None) -> tuple[Launch, dict]:
    """Plan ce_kernel on logits [N, C]. backward = (wrow [1] or [N] fp32, wcls [K] fp32) or None.

    Returns (launch, outputs): forward outputs ce [N], part [G, 2K]; backward output dz [N, C].
    """
    N, C = logits.shape
    K = num_classes
    block_n, block_c = row_blocks(N, max(C, K))
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
    return Launch(ce_kernel, (G,),
                  dict(z_ptr=logits, y_ptr=y, ce_ptr=ce, part_ptr=part, wrow_ptr=wrow, wcls_ptr=wcls, dz_ptr=dz,
                       N=N, C=C, K=K, stride_z=logits.stride(0), stride_dz=stride_dz, stride_wrow=stride_wrow),
                  dict(BACKWARD=backward is not None, BLOCK_N=block_n, BLOCK_C=block_c)), outs


def _ce_forward(logits, y, K):
    launch, outs = plan_ce(logits, y, K)
    L.run_launch(launch)
    sums, counts = _finish_partials(outs["part"], K)
    return outs["ce"], sums, counts


def _ce_backward(logits, y, K, wrow, wcls):
    launch, outs = plan_ce(logits, y, K, backward=(wrow.float(), wcls.float().contiguous()))
    L.run_launch(launch)
    return outs["dz"]


def plan_class_stats(values, y, num_classes) -> tuple[Launch, torch.Tensor]:
    N = values.shape[0]
    block_n, block_k = row_blocks(N, num_classes)
    part = torch.empty(triton.cdiv(N, block_n), 2 * num_classes, dtype=torch.float32, device=values.device)
    return Launch(class_stats_kernel, (part.shape[0],),
                  dict(v_ptr=values, y_ptr=y, part_ptr=part, N=N, K=num_classes),
                  dict(BLOCK_N=block_n, BLOCK_K=block_k)), part


class _ClassStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, y, num_classes):
        check_device(values)
        launch, part = plan_class_stats(values.contiguous(), y.contiguous(), num_classes)
        L.run_launch(launch)
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
        check_device(logits)
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
    if rows_unsupported("class_ce_stats", logits, num_classes):
        return torch_ops.class_ce_stats(logits, y, num_classes)
    return _ClassCEStats.apply(rowmajor(logits), y.contiguous(), num_classes)


class _FatCELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, num_classes, lam, mode, superclass, ce_weight):
        check_device(logits)
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
    if rows_unsupported("fat_ce_loss", logits, num_classes):
        return torch_ops.fat_ce_loss(logits, y, num_classes, lam, mode, superclass, ce_weight)
    return _FatCELoss.apply(rowmajor(logits), y.contiguous(), num_classes, lam, mode, superclass, ce_weight)

