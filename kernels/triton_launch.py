"""The Triton kernels' shared plumbing: tile sizes and limits, Launch (one planned launch) and
run_launch, whether Triton interprets (TRITON_INTERPRET=1, fixed when triton is first imported), and
the row kernels' checks and tiles. The kernels and their ops are in triton_pgd.py,
triton_classes.py and triton_rows.py; triton_ops.py gathers them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import fallbacks

MAX_CLASSES = 8192
# Storage dtypes the kernels take; anything else (fp64 pins tests) goes to the torch twin.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: GPU tiles are sized for registers (checked spill-free by tests/test_kernels_aot.py);
# the interpreter's cost is per program instance, so it gets big tiles.
PGD_BLOCK = {False: 2048, True: 1 << 16}
ROW_TILE = {False: 2048, True: 1 << 16}
NUM_WARPS = 4


@triton.jit
def _probe_kernel(x_ptr):
    """Never launched: how triton.jit decorates (interpreted or compiled) when this is imported."""
    pass


@triton.jit
def label_rows(z_ptr, y_ptr, N, C, stride_z, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The row kernels' prologue: this program's rows [BLOCK_N] of logits z [N, C] (row stride
    stride_z, any float dtype) in fp32 with -inf on padding, and their labels y [N].

    Returns rows, cols [BLOCK_C], rmask (row < N), m2 (rmask and col < C), rows64 (int64 rows,
    for offsets past 2^31), z [BLOCK_N, BLOCK_C], y (int32; -1 on padded rows) and hit, the
    one-hot of the label (none on padded rows). Inlined by triton.jit into each kernel.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    m2 = rmask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.where(m2, z, float("-inf"))
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    hit = cols[None, :] == y[:, None]
    return rows, cols, rmask, m2, rows64, z, y, hit


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
INTERPRETED = _interpreted(_probe_kernel)
_MODE_MISMATCH = INTERPRETED != _interpreted(tl.sum)


def launch_device(launch: Launch) -> torch.device | None:
    return next((v.device for v in launch.args.values() if isinstance(v, torch.Tensor)), None)


def device_guard(device: torch.device | None):
    """torch.cuda.device(device) when it is not the current CUDA device (Triton launches on the
    current device and its current stream); a no-op context otherwise."""
    if device is not None and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def run_launch(launch: Launch):
    """Launch on the device of the launch's tensors; returns Triton's compiled kernel."""
    with device_guard(launch_device(launch)):
        return launch.fn[launch.grid](*launch.args.values(), **launch.constexprs, num_warps=launch.num_warps)


def check_device(t: torch.Tensor) -> None:
    """Refuse launches that cannot work, with a message that says why."""
    if _MODE_MISMATCH:
        raise RuntimeError("TRITON_INTERPRET changed between importing triton and fastfat.kernels.triton_ops; "
                           "set it before either is imported")
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError("fastfat.kernels.triton_ops needs CUDA tensors "
                           "(or TRITON_INTERPRET=1, set before importing triton, for CPU tensors)")


def row_blocks(n_rows: int, width: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): one whole row per tile, about ROW_TILE elements per program."""
    block_c = triton.next_power_of_2(max(width, 2))
    block_n = max(1, min(ROW_TILE[INTERPRETED] // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_n, block_c


def rows_unsupported(op: str, logits: torch.Tensor, num_classes: int, other: torch.Tensor | None = None) -> bool:
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


def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """[N, C] with unit column stride (the kernels take a row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()

