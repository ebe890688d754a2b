"""Training-epoch time of the training attacks side by side, in one process: PGD-5, PGD-10,
FGSM-RS and N-FGSM (fastfat's train_attack) as the attack of FAT on Madry.

    python -m bench.single_step               # CPU, one thread: the demo CNN on digits, ResNet18 width 16
    python -m bench.single_step --threads 2   # CPU, two threads per step
    python -m bench.single_step --quick       # tiny sizes in seconds (the smoke test runs it)
    python -m bench.single_step --device cuda # GPU: ResNet18 width 16 and 64, batch 128, bf16

What is timed: one training epoch of fixed batches (the demo CNN: 28 batches of 64 digits, about
the 1,797-image set; ResNet18: 8 batches of 128 32x32 images), each step = attack + train-mode
forward + FAT loss + SGD (Trainer.train_step), the same initial weights and batches for every
attack. The attacks alternate step by step (batch 1 under PGD-5, PGD-10, FGSM-RS and N-FGSM,
then batch 2, ...) over `--repeats` rounds, so a burst of load from other processes falls on one
step of each; an attack's epoch is the sum over the batches of each step's least time over the
rounds, shown with its throughput relative to PGD-5's. (Whole epochs alternated, best of 2,
moved the ratio by +-10% from run to run on the shared 2-core development CPU.)

The convolution bound: after the timed rounds, `--repeats` more rounds run each step under
torch.profiler (at one thread on the CPU, where a sharded attack's threads would overlap), in the
same order; the time its convolutions took (forward and input- and weight-gradient backward: CPU time
on the CPU, kernel time on CUDA) gives the ratio the attacks would have if every other op
(BatchNorm, ReLU, pooling, the loss, SGD) were free. PGD-5's epoch is 5 attack steps and one
training step, a single-step attack's 1 and 1, so the bound is (5 + r) / (1 + r) for a training
step whose convolutions cost r attack steps'. The issue's 3x took r = 1, but the training step's
backward computes the weight gradients as well as the input ones (r >= 1.5 at equal speeds), and
on the 2-core AVX2 CPU a weight-gradient convolution is slower than a forward one: docs/fast.md
has the measured r and bound.

bench.gpu stage S calls run_single_step_bench(device) and gets the same numbers as a dict.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastfat.config import make_train_config
from fastfat.runfiles import build_for_config
from fastfat.runtime import synchronize
from fastfat.train import Trainer

# attack name -> training config overrides (PGD's step eps/4, the single-step ones their defaults)
ATTACKS = {
    "pgd-5": dict(train_attack="pgd", steps=5, step_size="eps/4"),
    "pgd-10": dict(train_attack="pgd", steps=10, step_size="eps/4"),
    "fgsm-rs": dict(train_attack="fgsm-rs"),
    "n-fgsm": dict(train_attack="n-fgsm"),
}
BASE = dict(method="fat-madry", lam=0.5, co_guard="off", schedule="constant", epochs=1, seed=0)
# name -> (training config overrides, batches per epoch)
CPU_WORKLOADS = {
    "demo-cnn": (dict(preset="demo"), 28),   # digits 8x8, cnn width 32, batch 64
    "resnet18-w16": (dict(dataset="synthetic", model="resnet18", width=16, batch_size=128,
                          eps_train=8 / 255, lr=0.1), 8),
}
GPU_WORKLOADS = {
    "resnet18-w16": (CPU_WORKLOADS["resnet18-w16"][0], 16),
    "resnet18-w64": (dict(CPU_WORKLOADS["resnet18-w16"][0], width=64), 16),
}
QUICK_WORKLOADS = {
    "demo-cnn": (dict(preset="demo", width=8, batch_size=16), 2),
    "resnet18-w4": (dict(dataset="synthetic", model="resnet18", width=4, batch_size=16, eps_train=8 / 255), 2),
}
IMAGE_SIZE = {"digits": (1, 8), "synthetic": (3, 32)}   # the ResNet workloads time CIFAR-shaped batches


def _configs(overrides: dict, device: str, amp: str) -> dict:
    over = dict(overrides)
    preset = over.pop("preset", None)
    return {name: make_train_config(preset, **{**over, **BASE, **a, "device": device, "amp": amp})
            for name, a in ATTACKS.items()}


def _batches(cfg, n: int, device) -> list:
    c, s = IMAGE_SIZE[cfg.dataset]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.rand(cfg.batch_size, c, s, s, generator=g).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (cfg.batch_size,), generator=g).to(device)))
    return out


def step_seconds(trainer: Trainer, x, y, g, device) -> float:
    """Wall seconds of one training step (trainer.train_step) on batch x [N, C, H, W], y [N]."""
    synchronize(device)
    t0 = time.perf_counter()
    trainer.train_step(x, y, g)
    synchronize(device)
    return time.perf_counter() - t0


# the convolutions' top-level ops: their totals hold the oneDNN / cuDNN work beneath them
CONV_OPS = ("aten::convolution", "aten::convolution_backward")


def conv_seconds(trainer: Trainer, x, y, g, device) -> float:
    """Seconds one training step spends in convolutions (forward and backward), from
    torch.profiler: the ops' CPU time on the CPU, their kernels' time on CUDA. On the CPU run it
    at one thread: the CPU times of a batch sharded over threads add up instead of overlapping."""
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        trainer.train_step(x, y, g)
    attr = "device_time_total" if cuda else "cpu_time_total"
    return sum(getattr(e, attr) for e in prof.key_averages() if e.key in CONV_OPS) / 1e6


def _rounds(trainers: dict, batches, device, repeats: int, timer) -> dict:
    """{attack: its epoch's seconds by timer (one step's): each step's least over `repeats`
    rounds, summed over the batches}. The attacks alternate step by step (batch 1 under each
    attack, then batch 2, ...), so a burst of load from other processes falls on one step of each
    and the least of the rounds leaves it out; each round replays the attack noise."""
    best = {a: [math.inf] * len(batches) for a in trainers}
    for _ in range(repeats):
        gens = {a: torch.Generator(device=device).manual_seed(1) for a in trainers}
        for i, (x, y) in enumerate(batches):
            for a, t in trainers.items():
                best[a][i] = min(best[a][i], timer(t, x, y, gens[a], device))
    return {a: sum(v) for a, v in best.items()}


def _conv_bound(trainers: dict, batches, device, repeats: int) -> dict:
    """{attack: an epoch's convolution seconds (_rounds of conv_seconds)}, at one thread on the
    CPU."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _rounds(trainers, batches, device, repeats, conv_seconds)
    finally:
        torch.set_num_threads(threads)


def run_single_step_bench(device="cuda", workloads: dict | None = None, *, amp: str | None = None,
                          repeats: int = 2, log=print, conv_bound: bool = True) -> dict:
    """{"device", "amp", "results": [{"workload", "attack", "epoch_s" (_rounds),
    "images_per_s", "vs_pgd5" (throughput / PGD-5's), "conv_s" (the convolutions' seconds in an
    epoch, _rounds of profiled steps), "conv_bound_vs_pgd5" (PGD-5's conv_s / this
    attack's: the ratio with every other op free)}], "steps": [{"workload", and split_steps'
    keys}]}: each workload's attacks timed alternately, every trainer from the same initial
    weights, after one untimed warm-up step; conv_bound=False leaves the profiled epochs (the two
    conv keys and "steps") out."""
    device = torch.device(device)
    if workloads is None:
        workloads = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    amp = amp or ("bf16" if device.type == "cuda" else "off")
    results, steps = [], []
    for name, (over, n_batches) in workloads.items():
        cfgs = _configs(over, str(device), amp)
        first = next(iter(cfgs.values()))
        init = build_for_config(first, device).state_dict()
        trainers = {}
        for a, cfg in cfgs.items():
            model = build_for_config(cfg, device)
            model.load_state_dict(init)
            trainers[a] = Trainer(cfg, model, device)
        batches = _batches(first, n_batches, device)
        for t in trainers.values():   # warm-up: oneDNN primitives, worker threads, cuDNN plans
            step_seconds(t, *batches[0], torch.Generator(device=device).manual_seed(0), device)
        best = _rounds(trainers, batches, device, repeats, step_seconds)
        conv = _conv_bound(trainers, batches, device, repeats) if conv_bound else None
        images = n_batches * first.batch_size
        for a in trainers:
            row = {"workload": name, "attack": a, "epoch_s": best[a], "images_per_s": images / best[a],
                   "vs_pgd5": best["pgd-5"] / best[a]}
            if conv is not None:
                row.update(conv_s=conv[a], conv_bound_vs_pgd5=conv["pgd-5"] / conv[a])
            results.append(row)
            if log is not None:
                log(format_row(row))
        if conv is not None:
            steps.append({"workload": name, **split_steps(conv)})
            if log is not None:
                log(format_steps(steps[-1]))
    out = {"device": str(device), "amp": amp, "results": results}
    if conv_bound:
        out["steps"] = steps
    return out


def split_steps(conv: dict) -> dict:
    """An epoch's convolution seconds split into its steps' from PGD-5's (5 attack steps + the
    training step) and PGD-10's (10 + 1): {"attack_step_s", "train_step_s", "r" (the training
    step in attack steps), "bound" ((5 + r) / (1 + r): a single-step attack's ratio to PGD-5
    at the convolution bound)}; r and bound are NaN where noise made either step's seconds <= 0
    (tiny sizes)."""
    a = (conv["pgd-10"] - conv["pgd-5"]) / 5
    t = conv["pgd-5"] - 5 * a
    r = t / a if a > 0 and t > 0 else math.nan
    return {"attack_step_s": a, "train_step_s": t, "r": r, "bound": (5 + r) / (1 + r)}


def format_steps(s: dict) -> str:
    head = (f"{s['workload']:>13} convolutions per epoch: attack step {s['attack_step_s']:.3f} s, "
            f"training step {s['train_step_s']:.3f} s")
    if math.isnan(s["r"]):
        return head + " (too noisy to split)"
    return head + f" = {s['r']:.2f} attack steps; (5 + r) / (1 + r) = x{s['bound']:.2f}"


def format_row(r: dict) -> str:
    line = (f"{r['workload']:>13} {r['attack']:>8}  epoch {r['epoch_s']:8.2f} s  "
            f"{r['images_per_s']:8.1f} img/s  x{r['vs_pgd5']:.2f} of PGD-5")
    if "conv_s" in r:
        line += f"  | convolutions {r['conv_s']:7.2f} s  x{r['conv_bound_vs_pgd5']:.2f}"
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.single_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the packaged grids run one thread per worker, a "
                        "worker per core)")
    p.add_argument("--amp", default=None, help="off | bf16 (default: bf16 on CUDA, off on the CPU)")
    p.add_argument("--workload", nargs="+", default=None, help="names of the workloads to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-conv-bound", action="store_true", help="leave out the profiled epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    table = QUICK_WORKLOADS if args.quick else (GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS)
    if args.workload:
        unknown = sorted(set(args.workload) - set(table))
        if unknown:
            print(f"bench.single_step: unknown workload(s) {', '.join(unknown)}; choose from "
                  f"{', '.join(table)}", file=sys.stderr)
            return 2
        table = {k: table[k] for k in args.workload}
    repeats = 1 if args.quick else args.repeats
    print(f"bench.single_step on {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), FAT-Madry lambda 0.5, each step the least of "
          f"{repeats}; right of |: the epoch's convolutions (profiled"
          f"{', at one thread' if device.type == 'cpu' else ''}) and the ratio they bound")
    res = run_single_step_bench(device, table, amp=args.amp, repeats=repeats,
                                conv_bound=not args.no_conv_bound)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
