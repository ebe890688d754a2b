"""One command that proves and measures fastfat on a GPU:

    python -m bench.gpu --out DIR              # about 8 minutes on an H200 (--budget seconds)
    python -m bench.gpu --out DIR --smoke      # every stage on the CPU at toy sizes, in seconds

Stages, in this order, each under a share of the time budget and inside try/except (an error is
recorded and the next stage runs); DIR/gpu.json is rewritten after every stage and every row,
so a run that is cut off still reports what it measured:
  A  machine: GPU, clocks (nvidia-smi), torch / triton / cuDNN versions, TF32 state; the copy
     bandwidth and the bf16 matmul rate as ceilings.
  B  correctness (bench/gpu/checks.py): Triton serves CUDA tensors; no fallback to a torch twin
     in one FAT step (fp32, bf16); fast == reference in float64 over a few steps; the first fp32
     step with TF32 off; bf16's drift from the reference.
  C  FAT training step, images/s (bench/gpu/speed.py): reference fp32, fast fp32, fast bf16,
     fast bf16 + cudnn.benchmark on ResNet18 width 64 at batch 128 and 512 and WRN-34-10 at batch
     128; wall time beside GPU-busy time (profiler), FLOP rate and fraction of the bf16 ceiling.
  D  PGD-20 evaluation, images x eps / s: fast fp32 / bf16 against the reference, fp32 checked.
  E  kernels (bench/gpu/kernels.py): each Triton kernel against its torch twin and the
     reference's inline code (triton.testing.do_bench), GB/s against kernels/report.py's bytes;
     fails if a "Triton" time was measured on a twin.
  G  fused grid points (bench/gpu/fusion.py, bench.fused.run_fused_bench): K members as one
     fused model vs the same K one after another, images/s per model and the ratio, ResNet18
     width 64 (the paper's) and 16 at batch 128, bf16, K = 1, 2, 4, 8, 16 or until out of memory.
     It runs before F, which gets what is left.
  S  single-step training (bench/gpu/single_step.py, bench.single_step): one FAT-Madry epoch with
     PGD-5, PGD-10, FGSM-RS and N-FGSM, ResNet18 width 64 and 16, bf16, throughput vs PGD-5.
  F  torch.compile, last because compiling takes minutes: no fallback in a compiled FAT step
     (B's compiled half) and its speed beside C's rows; --graphs adds CUDA graphs
     (compile mode "reduce-overhead").
Then the summary (gpu.json "summary", DIR/summary.md): fast vs reference per FAT step and per
evaluation, the fraction of the bf16 matmul ceiling a FAT step reaches, kernel ratios, checks.

--smoke runs every stage on the CPU at toy sizes (Triton through TRITON_INTERPRET=1, which this
command sets when Triton is not imported yet; stage F is skipped with its reason), so that CI
(bench/test_bench_gpu.py) keeps the command working. Its numbers mean nothing.
Exit status 0 when every stage is "ok" (or "skipped" in the smoke run), 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

# Stage shares of the budget (seconds, full run); F gets what is left.
SHARES = {"A": 30, "B": 100, "C": 150, "D": 60, "E": 60, "G": 60, "H": 60, "S": 40}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu.json and summary.md")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: keeps the command working (CI)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; smoke 120)")
    p.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    p.add_argument("--stages", default="ABCDEGHSF", help="which stages to run (default ABCDEGHSF)")
    p.add_argument("--graphs", action="store_true", help="stage F: also CUDA graphs (compile mode reduce-overhead)")
    return p.parse_args(argv)


def _interpreter_for_smoke(device) -> str | None:
    """In a smoke run on the CPU, let Triton's interpreter serve the kernels (TRITON_INTERPRET=1
    must come before triton's import). Returns why not, or None."""
    if device.type != "cpu":
        return None
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from fastfat.kernels import triton_ops
    except Exception as e:  # noqa: BLE001
        return f"Triton does not import ({type(e).__name__}: {e}): Triton parts skipped"
    if not triton_ops.INTERPRETED:
        return "Triton was imported without TRITON_INTERPRET=1 before this command: Triton parts skipped"
    os.environ["FASTFAT_KERNELS"] = "triton"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    triton_note = _interpreter_for_smoke(device) if args.smoke else None
    if args.smoke:
        torch.set_num_threads(1)   # one thread: the CPU attack split would run the interpreter on two

    from fastfat.runtime import set_backends

    from .summary import summarize
    from .util import FULL, SMOKE, Budget, Record, run_stage, sizes_dict

    def stage(module: str, fn: str):
        """A stage function imported when its stage runs: an import that fails on this machine
        (a package it lacks) is then that stage's recorded error, not the whole run's."""
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{module}"), fn)

    sizes = SMOKE if args.smoke else FULL
    budget = Budget(args.budget if args.budget is not None else (120 if args.smoke else 480))
    os.makedirs(args.out, exist_ok=True)
    set_backends(device, tf32=False, cudnn_benchmark=False)     # explicit: fp32 means fp32
    record = Record(os.path.join(args.out, "gpu.json"), {
        "command": ["python", "-m", "bench.gpu"] + list(argv if argv is not None else sys.argv[1:]),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke, "device": str(device), "budget_s": budget.left(), "sizes": sizes_dict(sizes),
        "triton_note": triton_note})
    a = {}
    plan = [("A", "machine and ceilings", lambda d, c: stage("machine", "stage_a")(d, device, sizes, c)),
            ("B", "correctness on the device", lambda d, c: stage("checks", "stage_b")(d, device, sizes, c, record)),
            ("C", "FAT step images/s",
             lambda d, c: stage("speed", "stage_c")(d, device, sizes, c, record, _ceiling(a))),
            ("D", "PGD evaluation images x eps/s", lambda d, c: stage("speed", "stage_d")(d, device, sizes, c, record)),
            ("E", "kernels vs twins vs reference",
             lambda d, c: stage("kernels", "stage_e")(d, device, sizes, c, record)),
            ("G", "fused grid points: K members vs one after another",
             lambda d, c: stage("fusion", "stage_g")(d, device, sizes, c, record, args.smoke)),
            ("H", "AutoAttack apgd: fastfat vs pyautoattack",
             lambda d, c: stage("aa", "stage_h")(d, device, sizes, c, record)),
            ("S", "single-step training: PGD-5, PGD-10, FGSM-RS, N-FGSM epochs",
             lambda d, c: stage("single_step", "stage_s")(d, device, sizes, c, record, args.smoke)),
            ("F", "torch.compile: fallbacks and speed",
             lambda d, c: stage("speed", "stage_f")(d, device, sizes, c, record, _ceiling(a), args.graphs))]
    for name, title, fn in plan:
        if name not in args.stages:
            continue
        clock = budget.stage(SHARES.get(name, budget.left()) * (0.5 if args.smoke else 1.0))
        print(f"bench.gpu: stage {name} ({title}), {clock.left():.0f} s ...", flush=True)
        entry = run_stage(record, name, title, lambda data: fn(data, clock))
        if name == "A":
            a = entry["data"]
        print(f"bench.gpu: stage {name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f" -- {entry['error'].splitlines()[0]}" if entry["error"] else ""), flush=True)
    summary, md = summarize(record.doc)
    record.doc["summary"] = summary
    record.doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record.save()
    from fastfat.files import atomic_write_text
    atomic_write_text(os.path.join(args.out, "summary.md"), md)
    print(md)
    bad = [k for k, v in record.doc["stages"].items() if v["status"] not in ("ok", "skipped")]
    print(f"bench.gpu: {'all stages ok' if not bad else 'not ok: ' + ', '.join(bad)}; wrote "
          f"{os.path.join(args.out, 'gpu.json')}")
    return 1 if bad else 0


def _ceiling(a: dict):
    return (a.get("matmul_bf16") or {}).get("TFLOP_per_s")
