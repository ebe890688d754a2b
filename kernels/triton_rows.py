"""The per-row loss kernels and their ops: the C&W margin (cw_margin) and TRADES' KL(softmax(nat) ||
softmax(adv)) (trades_kl), each per sample with its gradient."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fallbacks, torch_ops
from . import triton_launch as L
from .triton_launch import Launch, check_device, row_blocks, rowmajor, rows_unsupported, label_rows

@triton.jit
def cw_kernel(z_ptr, y_ptr, out_ptr, g_ptr, dz_ptr, N, C, stride_z, stride_dz, stride_g, kappa,
               BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """margin_i = z_iy - max_{j != y_i} z_ij + kappa; forward out_i = -max(margin_i, 0) (fp32).

    backward (as torch's autograd of torch_ops.cw_margin): where margin > 0, dz_iy = -g_i and
    g_i is shared evenly by the tied maxima among j != y_i (amax's rule); 0 elsewhere.
    NaN as torch: a NaN logit makes the row's output NaN; a NaN among j != y_i also makes
    dz_ij NaN for every j != y_i.
    """
    rows, cols, rmask, m2, rows64, z, y, hit = label_rows(z_ptr, y_ptr, N, C, stride_z, BLOCK_N, BLOCK_C)
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
def kl_kernel(za_ptr, zn_ptr, out_ptr, g_ptr, dza_ptr, dzn_ptr, N, C,
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



def plan_cw(logits, y, kappa, g=None) -> tuple[Launch, torch.Tensor]:
    """Forward (g None): output [N] fp32. Backward: g [N] fp32 -> output dz like logits."""
    N, C = logits.shape
    block_n, block_c = row_blocks(N, C)
    if g is None:
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        gp, dz, stride_dz, stride_g = out, out, 0, 0
    else:
        out = dz = torch.empty((N, C), dtype=logits.dtype, device=logits.device)
        gp, stride_dz, stride_g = g, C, g.stride(0)
    return Launch(cw_kernel, (triton.cdiv(N, block_n),),
                  dict(z_ptr=logits, y_ptr=y, out_ptr=out, g_ptr=gp, dz_ptr=dz, N=N, C=C,
                       stride_z=logits.stride(0), stride_dz=stride_dz, stride_g=stride_g, kappa=float(kappa)),
                  dict(BACKWARD=g is not None, BLOCK_N=block_n, BLOCK_C=block_c)), out


class _CWMargin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, y, kappa):
        check_device(logits)
        launch, out = plan_cw(logits, y, kappa)
        L.run_launch(launch)
        ctx.save_for_backward(logits, y)
        ctx.kappa = kappa
        return out

    @staticmethod
    def backward(ctx, g):
        logits, y = ctx.saved_tensors
        launch, dz = plan_cw(logits, y, ctx.kappa, g=g.float())
        L.run_launch(launch)
        return dz, None, None


def cw_margin(logits, y, kappa=50.0):
    """logits [N, C], y [N] -> -clamp(z_y - max_{j != y} z_j + kappa, min=0), [N] fp32, differentiable."""
    if rows_unsupported("cw_margin", logits, logits.shape[1]):
        return torch_ops.cw_margin(logits, y, kappa)
    return _CWMargin.apply(rowmajor(logits), y.contiguous(), kappa)


def plan_kl(logits_adv, logits_nat, g=None, need_nat=False) -> tuple[Launch, dict]:
    """Forward (g None): kl [N] fp32. Backward: g [N] fp32 -> dza (and dzn if need_nat) like the inputs."""
    N, C = logits_adv.shape
    block_n, block_c = row_blocks(N, C)
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
    return Launch(kl_kernel, (triton.cdiv(N, block_n),),
                  dict(za_ptr=logits_adv, zn_ptr=logits_nat, out_ptr=out, g_ptr=gp, dza_ptr=dza, dzn_ptr=dzn,
                       N=N, C=C, stride_a=logits_adv.stride(0), stride_n=logits_nat.stride(0),
                       stride_g=strides[0], stride_da=strides[1], stride_dn=strides[2]),
                  dict(BACKWARD=g is not None, NEED_NAT=bool(need_nat), BLOCK_N=block_n, BLOCK_C=block_c)), outs


class _TradesKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_adv, logits_nat):
        check_device(logits_adv)
        launch, outs = plan_kl(logits_adv, logits_nat)
        L.run_launch(launch)
        ctx.save_for_backward(logits_adv, logits_nat)
        return outs["kl"]

    @staticmethod
    def backward(ctx, g):
        za, zn = ctx.saved_tensors
        need_nat = ctx.needs_input_grad[1]
        launch, outs = plan_kl(za, zn, g=g.float(), need_nat=need_nat)
        L.run_launch(launch)
        return outs["dza"], outs["dzn"]


def trades_kl(logits_adv, logits_nat):
    """KL(softmax(nat) || softmax(adv)) per sample: [N, C] x2 -> [N] fp32, differentiable in both."""
    if rows_unsupported("trades_kl", logits_adv, logits_adv.shape[1], logits_nat):
        return torch_ops.trades_kl(logits_adv, logits_nat)
    return _TradesKL.apply(rowmajor(logits_adv), rowmajor(logits_nat))
