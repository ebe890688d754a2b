"""Stage E: each Triton kernel against its torch twin (kernels/torch_ops.py) and the reference's
inline code (fastfat.reference's update, loss and loops), timed with triton.testing.do_bench, with
GB/s from kernels/report.py's static byte counts (what each implementation must read and write
per element). A "Triton" number timed while a fallback to the twin was counted is an error: the
stage fails rather than report the twin's time as Triton's."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import kernels as K
from fastfat import reference
from fastfat.kernels import report
from fastfat.kernels import torch_ops as R

from ..common import ref_update
from .util import bench_ms, guarded

EPS, ALPHA = 8 / 255, 0.007


def _bytes(op: str, s: int) -> tuple[int, int]:
    """(Triton, twin) bytes per element of `op` at storage size s, from kernels/report.py; op
    may be "a + b" (forward and backward timed together)."""
    parts = [p.strip() for p in op.split(" + ")]
    tri = sum(report.TRITON_BYTES[p](s) for p in parts)
    twin = sum(r + w for p in parts for _, r, w in report.TORCH_PASSES[p](s))
    return tri, twin


def _grad(f, *inputs):
    def run():
        out = f()
        return torch.autograd.grad(out, inputs)
    return run


def cases(device, sizes):
    """(op label, report key, dtype, elements, {impl: fn}) for every timed kernel."""
    out = []
    n = sizes.kernel_images
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator(device).manual_seed(0)
        x = torch.rand(n, 3, 32, 32, generator=g, device=device)
        xa = (x + (torch.rand(x.shape, generator=g, device=device) * 2 - 1) * EPS).clamp(0, 1)
        gr = torch.randn(x.shape, generator=g, device=device)
        cl = [t.to(dt).contiguous(memory_format=torch.channels_last) for t in (xa, x, gr)]
        nchw = [t.to(dt) for t in (xa, x, gr)]
        out.append(("pgd_step", "pgd_step", dt, x.numel(), {
            "triton": lambda cl=cl: K.pgd_step(*cl, ALPHA, EPS),
            "twin": lambda cl=cl: R.pgd_step(*cl, ALPHA, EPS),
            "reference": lambda nchw=nchw: ref_update(*nchw, ALPHA, EPS)}))
    rows = sizes.kernel_rows
    for c in sizes.kernel_classes:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator(device).manual_seed(1)
            z = (torch.randn(rows, c, generator=g, device=device) * 3).to(dt).requires_grad_()
            zn = (torch.randn(rows, c, generator=g, device=device) * 3).to(dt).requires_grad_()
            y = torch.randint(0, c, (rows,), generator=g, device=device)
            el = rows * c
            ref_kl = lambda a, b: nn.KLDivLoss(reduction="sum")(F.log_softmax(a.float(), 1), F.softmax(b.float(), 1))
            out += [
                (f"FAT loss fwd C={c}", "class_ce_stats / fat_ce_loss forward", dt, el, {
                    "triton": lambda z=z, y=y, c=c: K.fat_ce_loss(z, y, c, 0.5)[0],
                    "twin": lambda z=z, y=y, c=c: R.fat_ce_loss(z, y, c, 0.5)[0],
                    "reference": lambda z=z, y=y, c=c: reference.ref_fat_loss(z.float(), y, c, 0.5)}),
                (f"FAT loss fwd+bwd C={c}", "class_ce_stats / fat_ce_loss forward + fat_ce_loss backward", dt, el, {
                    "triton": _grad(lambda z=z, y=y, c=c: K.fat_ce_loss(z, y, c, 0.5)[0], z),
                    "twin": _grad(lambda z=z, y=y, c=c: R.fat_ce_loss(z, y, c, 0.5)[0], z),
                    "reference": _grad(lambda z=z, y=y, c=c: reference.ref_fat_loss(z.float(), y, c, 0.5), z)}),
                (f"C&W margin fwd C={c}", "cw_margin forward", dt, el, {
                    "triton": lambda z=z, y=y: K.cw_margin(z, y).sum(),
                    "twin": lambda z=z, y=y: R.cw_margin(z, y).sum(),
                    "reference": lambda z=z, y=y: reference.ref_cwloss(z.float(), y)}),
                (f"C&W margin fwd+bwd C={c}", "cw_margin forward + cw_margin backward", dt, el, {
                    "triton": _grad(lambda z=z, y=y: K.cw_margin(z, y).sum(), z),
                    "twin": _grad(lambda z=z, y=y: R.cw_margin(z, y).sum(), z),
                    "reference": _grad(lambda z=z, y=y: reference.ref_cwloss(z.float(), y), z)}),
                (f"TRADES KL fwd C={c}", "trades_kl forward", dt, el, {
                    "triton": lambda z=z, zn=zn: K.trades_kl(z, zn).sum(),
                    "twin": lambda z=z, zn=zn: R.trades_kl(z, zn).sum(),
                    "reference": lambda z=z, zn=zn: ref_kl(z, zn)}),
                (f"TRADES KL fwd+bwd C={c}", "trades_kl forward + trades_kl backward (both inputs)", dt, el, {
                    "triton": _grad(lambda z=z, zn=zn: K.trades_kl(z, zn).sum(), z, zn),
                    "twin": _grad(lambda z=z, zn=zn: R.trades_kl(z, zn).sum(), z, zn),
                    "reference": _grad(lambda z=z, zn=zn: ref_kl(z, zn), z, zn)}),
            ]
    return out


def _time_case(device, key, dt, elements, fns) -> dict:
    s = torch.finfo(dt).bits // 8
    tri_b, twin_b = _bytes(key, s)
    row = {}
    K.reset_fallback_counts()
    row["triton_ms"] = bench_ms(fns["triton"], device)
    fb = K.fallback_counts()
    if fb:
        raise RuntimeError(f"the 'Triton' time was measured on the torch twin (fallbacks {fb})")
    row["twin_ms"] = bench_ms(fns["twin"], device)
    row["reference_ms"] = bench_ms(fns["reference"], device)
    row["triton_GB_per_s"] = tri_b * elements / row["triton_ms"] / 1e6
    row["twin_GB_per_s"] = twin_b * elements / row["twin_ms"] / 1e6
    row["bytes_per_element"] = {"triton": tri_b, "twin": twin_b}
    row["triton_vs_twin"] = row["twin_ms"] / row["triton_ms"]
    row["triton_vs_reference"] = row["reference_ms"] / row["triton_ms"]
    return row


def stage_e(data: dict, device, sizes, clock, record) -> str:
    if K.backend(torch.empty(1, device=device)) != "triton":
        data["skipped"] = "Triton does not serve this device's tensors here (no Triton, or CPU without TRITON_INTERPRET=1)"
        return "skipped"
    rows = data.setdefault("rows", [])
    for op, key, dt, elements, fns in cases(device, sizes):
        row = {"op": op, "dtype": str(dt).removeprefix("torch."), "elements": elements}
        if not clock.allows(3):
            rows.append({**row, "skipped": "out of the stage's time"})
            continue
        guarded(rows, row, lambda: _time_case(device, key, dt, elements, fns), record)
    return "ok" if all("error" not in r for r in rows) else "failed"
