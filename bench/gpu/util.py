"""bench.gpu's plumbing: workload sizes (full and smoke), the time budget, the JSON record written
after every stage and row, and the timers (CUDA events, triton.testing.do_bench, the profiler's
GPU-busy time)."""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from fastfat.files import atomic_write_json
from fastfat.runtime import backend_flags, synchronize


@dataclass(frozen=True)
class Sizes:
    """What each stage runs. FULL fits the 8-minute budget on an H200; SMOKE runs every stage on
    a CPU in seconds (its numbers mean nothing: it only keeps the command working)."""
    workloads: tuple        # stage C: (label, model, width or None, batch)
    attack_steps: int       # PGD steps of the training attack (the authors' PGD-10)
    timed_steps: int        # stage C: steps timed per row (after one warm-up step)
    check_width: int        # stage B: ResNet18 width of the correctness checks
    check_batch: int
    match_steps: int        # stage B: steps of the float64 and drift comparisons
    eval_model: tuple       # stage D: (model, width)
    eval_images: int
    eval_batch: int
    eval_eps: tuple
    eval_attack: str
    kernel_images: int      # stage E: pgd_step on [N, 3, 32, 32]
    kernel_rows: int        # stage E: logits [rows, C]
    kernel_classes: tuple
    copy_bytes: int         # stage A: device-to-device copy
    matmul_n: int           # stage A: bf16 matmul n x n x n


FULL = Sizes(workloads=(("ResNet18 w64 b128", "resnet18", 64, 128), ("ResNet18 w64 b512", "resnet18", 64, 512),
                        ("WRN-34-10 b128", "wrn-34-10", None, 128)),
             attack_steps=10, timed_steps=3, check_width=16, check_batch=128, match_steps=4,
             eval_model=("resnet18", 64), eval_images=512, eval_batch=256, eval_eps=(8 / 255, 16 / 255),
             eval_attack="pgd20", kernel_images=4096, kernel_rows=65536, kernel_classes=(10, 100),
             copy_bytes=1 << 30, matmul_n=8192)
SMOKE = Sizes(workloads=(("ResNet18 w4 b8", "resnet18", 4, 8), ("ResNet18 w4 b16", "resnet18", 4, 16),
                         ("WRN-34-10 w2 b8", "wrn-34-10", 2, 8)),
              attack_steps=2, timed_steps=1, check_width=4, check_batch=16, match_steps=2,
              eval_model=("resnet18", 4), eval_images=16, eval_batch=8, eval_eps=(8 / 255, 16 / 255),
              eval_attack="pgd2", kernel_images=8, kernel_rows=64, kernel_classes=(10,),
              copy_bytes=1 << 20, matmul_n=64)


class Budget:
    """The run's deadline, and each stage's share of what is left."""

    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, share: float) -> "StageClock":
        return StageClock(min(self.deadline, time.monotonic() + share))


class StageClock:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        """Whether a piece of work estimated at `seconds` still fits."""
        return self.left() >= seconds


def clean(obj):
    """JSON-safe: non-finite floats -> None, tensors and dtypes -> plain values or strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


class Record:
    """gpu.json: the run's header, each stage's status / seconds / data / error, the summary.
    Rewritten (atomically) whenever save() is called: after every stage and row."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.doc = {**header, "stages": {}, "summary": None}
        self.save()

    def stage(self, name: str, title: str) -> dict:
        entry = {"title": title, "status": "running", "seconds": None, "error": None, "data": {}}
        self.doc["stages"][name] = entry
        self.save()
        return entry

    def save(self) -> None:
        atomic_write_json(self.path, clean(self.doc))


def run_stage(record: Record, name: str, title: str, fn, *args) -> dict:
    """fn(data, *args) under try/except: an error is recorded (type, message, traceback tail)
    and the run goes on. fn returns "ok", "failed" (a check did not hold) or "skipped"."""
    entry = record.stage(name, title)
    t0 = time.perf_counter()
    try:
        entry["status"] = fn(entry["data"], *args) or "ok"
    except Exception as e:  # noqa: BLE001 - recorded, then the next stage runs
        entry["status"] = "error"
        entry["error"] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc().splitlines(True)[-12:])
    entry["seconds"] = time.perf_counter() - t0
    record.save()
    return entry


def guarded(rows: list, row: dict, fn, record: Record | None = None):
    """Append row, fill it from fn() (a dict), or record its error; save after."""
    rows.append(row)
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - one row's failure does not stop the stage
        row["error"] = f"{type(e).__name__}: {e}"
    row["flags"] = backend_flags()   # TF32 and cuDNN state beside every number
    if record is not None:
        record.save()
    return row


# ---------------------------------------------------------------------------------------------
# Timers

def time_calls(fn, device: torch.device, calls: int, warmup: int = 1) -> dict:
    """Seconds per call of fn(): wall (perf_counter between device syncs) and, on CUDA, the span
    between CUDA events around the calls (the same when the host keeps the GPU fed)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    ev = None
    if device.type == "cuda":
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        ev[0].record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if ev is not None:
        ev[1].record()
    synchronize(device)
    wall = (time.perf_counter() - t0) / calls
    out = {"wall_s": wall, "calls": calls}
    if ev is not None:
        out["event_s"] = ev[0].elapsed_time(ev[1]) / 1e3 / calls
    return out


def gpu_busy(fn, device: torch.device) -> dict:
    """One call of fn() under torch.profiler: the summed time of the GPU kernels it ran (busy)
    against its wall time. busy / wall well under 1 means the step is launch-bound: the GPU
    waits for the host between kernels."""
    if device.type != "cuda":
        return {"busy_s": None, "note": "no GPU"}
    from torch.profiler import ProfilerActivity, profile
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - t0
    busy_us = 0.0
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            busy_us += getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
    return {"busy_s": busy_us / 1e6, "profiled_wall_s": wall, "busy_fraction": busy_us / 1e6 / wall if wall else None}


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA (it flushes the L2 cache
    between calls, so kernels are timed from memory), a few perf_counter calls elsewhere."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def sizes_dict(sizes: Sizes) -> dict:
    return asdict(sizes)
