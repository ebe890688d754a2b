"""Ahead-of-time compilation of fastfat's Triton kernels for GPUs this machine does not have.

`cases()` builds, on meta tensors, the launches the ops in kernels/triton_ops.py make for each
dtype signature (the same plan functions the ops call, so the compiled signature is the launched
one). `compile_launch` compiles one for a GPUTarget; `resources` reads registers, spills and
shared memory off the cubin with cuobjdump from Triton's wheel.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_ops as T

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32"}


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _TYPE[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v)}")


def source(launch: T.Launch) -> ASTSource:
    """The ASTSource Triton's JIT would build for this launch (pointers 16-byte aligned, as fresh
    torch allocations are; integers divisible by 16 marked so, as the JIT does)."""
    if T.INTERPRETED:
        raise RuntimeError("ahead-of-time compiles need a process where triton was imported without TRITON_INTERPRET=1")
    sig, attrs = {}, {}
    for i, (name, v) in enumerate(launch.args.items()):
        sig[name] = _arg_type(v)
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        sig[name] = "constexpr"
    return ASTSource(fn=launch.fn, signature=sig, constexprs=dict(launch.constexprs), attrs=attrs)


def compile_launch(launch: T.Launch, target: GPUTarget):
    """Compile to ttir/ttgir/llir/ptx/cubin without a GPU; raises on a compile error."""
    return triton.compile(source(launch), target=target, options={"num_warps": launch.num_warps})


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Resources:
    registers: int
    stack: int       # bytes of per-thread stack frame (spilled registers live here)
    local: int       # bytes of local memory (spills or local arrays)
    shared: int      # bytes of static shared memory

    @property
    def spills(self) -> int:
        return self.stack + self.local


def resources(cubin: bytes) -> Resources:
    """Parse `cuobjdump -res-usage` for the (single) kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump(), "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    field = lambda k: int(re.search(rf"\b{k}:(\d+)", out).group(1))
    return Resources(field("REG"), field("STACK"), field("LOCAL"), field("SHARED"))


def cases(n: int = 512) -> list[tuple[str, T.Launch]]:
    """(label, launch) for every dtype signature and kernel variant the ops launch.

    Row kernels use C = 100 (CIFAR-100; the tile holds as many elements for C = 10); n rows,
    a batch of n images 3x32x32 for pgd_step. Labels are int64, per-sample alpha/eps fp32.
    """
    meta = dict(device="meta")
    out = []
    y = torch.empty(n, dtype=torch.int64, **meta)
    for dt in DTYPES:
        d = str(dt).removeprefix("torch.")
        x = torch.empty(n, 3, 32, 32, dtype=dt, **meta)
        out.append((f"pgd_step[{d}]", T.plan_pgd_step(x, x, x, 2 / 255, 8 / 255)))
        vec = torch.empty(n, dtype=torch.float32, **meta)
        out.append((f"pgd_step[{d},per-sample]", T.plan_pgd_step(x, x, x, vec, vec)))
        z = torch.empty(n, 100, dtype=dt, **meta)
        w = torch.empty(n, dtype=torch.float32, **meta)
        wc = torch.empty(100, dtype=torch.float32, **meta)
        out.append((f"ce_fwd[{d}]", T.plan_ce(z, y, 100)[0]))
        out.append((f"ce_bwd[{d}]", T.plan_ce(z, y, 100, backward=(w, wc))[0]))
        out.append((f"class_stats[{d}]", T.plan_class_stats(torch.empty(n, dtype=dt, **meta), y, 100)[0]))
        out.append((f"cw_fwd[{d}]", T.plan_cw(z, y, 50.0)[0]))
        out.append((f"cw_bwd[{d}]", T.plan_cw(z, y, 50.0, g=w)[0]))
        out.append((f"kl_fwd[{d}]", T.plan_kl(z, z)[0]))
        out.append((f"kl_bwd[{d}]", T.plan_kl(z, z, g=w)[0]))
        out.append((f"kl_bwd[{d},nat]", T.plan_kl(z, z, g=w, need_nat=True)[0]))
    part = torch.empty(64, 200, dtype=torch.float32, **meta)
    out.append(("reduce[fp32]", T.plan_reduce(part, torch.empty(200, dtype=torch.float32, **meta))))
    return out
