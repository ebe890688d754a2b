"""Stage A: the machine (GPU, clocks, versions, TF32 state) and two ceilings measured on it: the
device-to-device copy bandwidth and the bf16 matmul rate."""
from __future__ import annotations

import platform
import subprocess

import torch

from fastfat import kernels
from fastfat.runtime import backend_flags

from .util import bench_ms

NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "power.draw", "power.limit", "temperature.gpu", "utilization.gpu", "memory.used")


def nvidia_smi() -> dict:
    """The GPU's clocks, power and driver as nvidia-smi reports them now (or why not)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    first = out.strip().splitlines()[0]
    return dict(zip(NVIDIA_SMI_FIELDS, (v.strip() for v in first.split(","))))


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"not importable: {type(e).__name__}: {e}"
    return out


def stage_a(data: dict, device: torch.device, sizes, clock) -> str:
    data["versions"] = versions()
    data["flags"] = backend_flags()
    data["device"] = str(device)
    probe = torch.empty(1, device=device)
    data["kernel_backend"] = kernels.backend(probe)
    data["triton_import_error"] = list(getattr(kernels, "_TRITON_IMPORT_ERROR", []))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        data["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                       "memory_gib": p.total_memory / 2 ** 30, "count": torch.cuda.device_count()}
        data["nvidia_smi"] = nvidia_smi()
    else:
        data["gpu"] = None
        data["cpu"] = platform.processor() or platform.machine()
    # Ceilings. Copy: read + write of copy_bytes; matmul: 2 n^3 flops in bf16 (the step's
    # convolutions run on the same tensor cores under bf16 autocast).
    n = sizes.copy_bytes // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    data["copy"] = {"bytes": 2 * 4 * n, "ms": ms, "GB_per_s": 2 * 4 * n / ms / 1e6}
    del a, b
    m = sizes.matmul_n
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    w = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ w, device)
    data["matmul_bf16"] = {"n": m, "ms": ms, "TFLOP_per_s": 2 * m ** 3 / ms / 1e9}
    return "ok"
