"""Kernel report: `python -m fastfat.kernels.report`.

Per kernel variant and GPU target (compiled ahead of time, no GPU needed): registers, spill
bytes, shared memory. Per op: the bytes it moves per [N, C] (or per image) element, against the
plain-torch sequence it replaces, counted pass by pass from kernels/torch_ops.py. The counts are
static (what each pass reads and writes, assuming every pass streams its operands once and that
per-row / per-class vectors are negligible); they are not measurements, and nothing here has
been timed on a GPU.
"""
from __future__ import annotations

import argparse

# Torch passes per op: (what, bytes read, bytes written) per element, with s = bytes of the
# storage dtype (4 fp32, 2 bf16/fp16) and f = 4 for the fp32 temporaries the twins compute in.
# A cast pass `.float()` exists only when s != 4.
f = 4


def _cast(s, what):
    return [(f"{what}.float()", s, f)] if s != f else []


def _pgd_step(s):
    if s == f:
        # fp32 storage: torch_ops.pgd_step updates x_adv in place and reuses sign(grad)'s tensor
        # as the one scratch for both bounds, so no alpha * sign temporary and no copy back.
        return [("sign(grad) -> scratch", f, f), ("x_adv.add_(scratch, alpha=a)", 2 * f, f),
                ("sub(x_nat, eps, out=scratch)", f, f), ("maximum(.., out=x_adv)", 2 * f, f),
                ("add(x_nat, eps, out=scratch)", f, f), ("minimum(.., out=x_adv)", 2 * f, f),
                ("x_adv.clamp_(0, 1)", f, f)]
    # bf16/fp16 storage: the out-of-place fp32 path, then one cast back into x_adv
    return _cast(s, "x_adv") + _cast(s, "x_nat") + _cast(s, "grad") + [
        ("sign(grad)", f, f), ("alpha * sign", f, f), ("x_adv + step", 2 * f, f),
        ("x_nat - eps", f, f), ("maximum", 2 * f, f), ("x_nat + eps", f, f),
        ("minimum", 2 * f, f), ("clamp_(0, 1)", f, f), ("x_adv.copy_(out)", f, s)]


TORCH_PASSES = {
    "pgd_step": _pgd_step,
    "class_ce_stats / fat_ce_loss forward": lambda s: (
        _cast(s, "logits") + [("log_softmax", f, f)]),          # nll gathers 1 of C; index_add on [N]
    "fat_ce_loss backward": lambda s: [
        ("nll backward: zero-filled grad [N, C]", 0, f),
        ("log_softmax backward (grad, saved output)", 2 * f, f)] + (
        [("grad.to(dtype)", f, s)] if s != f else []),
    "cw_margin forward": lambda s: (
        _cast(s, "logits") + [("one_hot (int64)", 0, 8), ("one_hot.to(bool)", 8, 1),
                              ("masked_fill(-inf)", f + 1, f), ("amax", f, 0)]),
    "cw_margin backward": lambda s: [
        ("amax backward: input == max", 2 * f, 1), ("mask * grad / count", 1, f),
        ("masked_fill backward", f + 1, f), ("gather backward: zeros", 0, f),
        ("sum of the two grads", 2 * f, f)] + ([("grad.to(dtype)", f, s)] if s != f else []),
    "trades_kl forward": lambda s: (
        _cast(s, "adv") + _cast(s, "nat") + [
            ("log_softmax(adv)", f, f), ("log_softmax(nat)", f, f), ("exp", f, f),
            ("logp_nat - logp_adv", 2 * f, f), ("p * diff", 2 * f, f), ("sum(1)", f, 0)]),
    "trades_kl backward (both inputs)": lambda s: [
        ("grad * diff", f, f), ("grad * p", f, f), ("exp backward", 2 * f, f),
        ("add (nat)", 2 * f, f), ("neg (adv)", f, f),
        ("log_softmax backward (nat)", 2 * f, f), ("log_softmax backward (adv)", 2 * f, f)] + (
        [("grad.to(dtype) x2", 2 * f, 2 * s)] if s != f else []),
}

# The fused kernels: one read of each input, one write of each output.
TRITON_BYTES = {
    "pgd_step": lambda s: 4 * s,                                 # read x_adv, x_nat, grad; write x_adv
    "class_ce_stats / fat_ce_loss forward": lambda s: s,         # read logits once
    "fat_ce_loss backward": lambda s: 2 * s,                     # read logits, write dlogits
    "cw_margin forward": lambda s: s,
    "cw_margin backward": lambda s: 2 * s,
    "trades_kl forward": lambda s: 2 * s,
    "trades_kl backward (both inputs)": lambda s: 4 * s,
}


def bytes_table() -> list[str]:
    lines = ["bytes moved per element (static count; s = storage bytes)",
             f"{'op':40s} {'dtype':6s} {'triton':>7s} {'torch':>7s} {'ratio':>6s} {'torch passes':>12s}"]
    for op, passes in TORCH_PASSES.items():
        for name, s in (("fp32", 4), ("bf16", 2)):
            p = passes(s)
            torch_b = sum(r + w for _, r, w in p)
            tri = TRITON_BYTES[op](s)
            lines.append(f"{op:40s} {name:6s} {tri:7d} {torch_b:7d} {torch_b / tri:5.1f}x {len(p):12d}")
    return lines


def resources_table() -> list[str]:
    from . import aot
    lines = [f"{'kernel variant':34s} {'target':7s} {'regs':>5s} {'spill':>6s} {'smem static':>11s} "
             f"{'smem triton':>11s} {'warps':>5s}"]
    for label, launch in aot.cases():
        for target in aot.TARGETS:
            k = aot.compile_launch(launch, target)
            r = aot.resources(k.asm["cubin"])
            lines.append(f"{label:34s} sm_{target.arch:<4d} {r.registers:5d} {r.spills:6d} {r.shared:11d} "
                         f"{k.metadata.shared:11d} {launch.num_warps:5d}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastfat.kernels.report", description=__doc__.split("\n")[0])
    ap.add_argument("--no-compile", action="store_true", help="only the bytes table (no Triton compiles)")
    args = ap.parse_args(argv)
    if not args.no_compile:
        print("\n".join(resources_table()))
        print("spill = stack + local bytes per thread (cuobjdump -res-usage); smem static from the cubin,"
              " smem triton = dynamic shared memory Triton requests at launch\n")
    print("\n".join(bytes_table()))
    print("\nNot timed on a GPU: these are static counts and compile-time resources only.")


if __name__ == "__main__":
    main()
