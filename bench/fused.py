"""Fused grid points against the same points one after another, side by side in one process:
K members trained as one FusedModel (fastfat.fused) vs K unfused Trainers, for K in 1, 2, 4, 8.

    python -m bench.fused                 # CPU: the demo CNN on digits, ResNet18 width 16 (32x32)
    python -m bench.fused --quick         # tiny sizes in seconds (the smoke test runs it)
    python -m bench.fused --profile       # also the top ops of one fused demo-CNN step at K=4
    python -m bench.fused --device cuda   # GPU: ResNet18 width 16 and 64 (the paper's), batch
                                          # 128, bf16, K up to 16 or the memory

What is timed: training steps (attack + train-mode forward + loss + SGD) on fixed batches, one
per member, each member with its own seed, radius, lambda and attack generator: the unfused side
runs `--steps` steps of member 1, then of member 2, ... (a sweep's order); the fused side runs
`--steps` steps of the group. The two sides alternate `--repeats` times (unfused, fused,
unfused, ...), so load from other processes falls on both alike; the table shows medians. One
step of each side runs first, untimed (oneDNN primitives, worker threads, cuDNN plans).
"img/s" is all members' images per second; "per model" divides it by K; the ratio is
unfused time / fused time. Members: FAT on Madry at eps_train 2/255 ... 8/255, lambda 0 ... 1,
seeds 0 ... K-1 (they fuse: fastfat.fused.train.check_fusable).

bench.gpu calls run_fused_bench(device) and gets the same numbers as a dict.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from fastfat.config import make_train_config
from fastfat.fused import fuse_models
from fastfat.fused.train import FusedTrainer
from fastfat.runfiles import build_for_config
from fastfat.runtime import synchronize
from fastfat.train import Trainer

# name -> training config overrides (device and amp are set per run)
CPU_WORKLOADS = {
    "demo-cnn": dict(preset="demo"),   # digits 8x8, cnn width 32, batch 64, PGD-5
    "resnet18-w16": dict(dataset="synthetic", model="resnet18", width=16, batch_size=128, steps=10,
                         step_size="0.007", eps_train=8 / 255, lr=0.1),
}
GPU_WORKLOADS = {
    "resnet18-w16": CPU_WORKLOADS["resnet18-w16"],
    "resnet18-w64": dict(CPU_WORKLOADS["resnet18-w16"], width=64),   # the paper's ResNet18
}
QUICK_WORKLOADS = {
    "demo-cnn": dict(preset="demo", width=8, batch_size=16, steps=2),
    "resnet18-w4": dict(dataset="synthetic", model="resnet18", width=4, batch_size=16, steps=2,
                        step_size="eps/2", eps_train=8 / 255),
}
# The synthetic set is 16x16; the ResNet18 workloads time CIFAR-shaped 32x32 batches.
IMAGE_SIZE = {"digits": (1, 8), "synthetic": (3, 32)}


def member_configs(overrides: dict, k: int, device: str, amp: str) -> list:
    """K members of one workload that fuse: FAT on Madry, own radius, lambda and seed."""
    over = dict(overrides)
    preset = over.pop("preset", None)
    eps = over.pop("eps_train", None)
    out = []
    for i in range(k):
        e = (eps if eps is not None else 8 / 255) * (1 + i % 4) / 4
        out.append(make_train_config(preset, **over, method="fat-madry", lam=(i % 5) / 4, seed=i,
                                     eps_train=e, device=device, amp=amp, schedule="constant",
                                     loader="memory"))
    return out


def member_batches(cfgs, device) -> list:
    """One fixed batch per member (x channels_last in [0, 1], y), each from its own seed."""
    c, n = IMAGE_SIZE[cfgs[0].dataset], cfgs[0].batch_size
    out = []
    for cfg in cfgs:
        g = torch.Generator().manual_seed(1000 + cfg.seed)
        x = torch.rand(n, c[0], c[1], c[1], generator=g).to(device)
        out.append((x.contiguous(memory_format=torch.channels_last),
                    torch.randint(0, 10, (n,), generator=g).to(device)))
    return out


class Pair:
    """The two sides of one (workload, K) measurement, ready to time."""

    def __init__(self, cfgs, device):
        self.cfgs, self.device, self.k = cfgs, torch.device(device), len(cfgs)
        self.batches = member_batches(cfgs, self.device)
        models = [build_for_config(c, self.device) for c in cfgs]
        self.fused = FusedTrainer(cfgs, fuse_models(models), self.device)
        self.singles = [Trainer(c, m, self.device) for c, m in zip(cfgs, models)]
        self.x = self.fused.model.stack([b[0] for b in self.batches])
        self.y = self.fused.model.stack([b[1] for b in self.batches])

    def gens(self):
        return [torch.Generator(device=self.device).manual_seed(c.seed) for c in self.cfgs]

    def unfused(self, steps: int) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        for t, (x, y), g in zip(self.singles, self.batches, self.gens()):
            for _ in range(steps):
                t.train_step(x, y, g)
        synchronize(self.device)
        return time.perf_counter() - t0

    def fused_steps(self, steps: int) -> float:
        gens = self.gens()
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.fused.train_step(self.x, self.y, gens)
        synchronize(self.device)
        return time.perf_counter() - t0


def measure(cfgs, device, steps: int, repeats: int) -> dict:
    """Median seconds of `steps` steps of every member, unfused and fused, and the rates."""
    pair = Pair(cfgs, device)
    pair.unfused(1)
    pair.fused_steps(1)
    tu, tf = [], []
    for _ in range(repeats):
        tu.append(pair.unfused(steps))
        tf.append(pair.fused_steps(steps))
    u, f = statistics.median(tu), statistics.median(tf)
    images = pair.k * cfgs[0].batch_size * steps
    return {"k": pair.k, "batch": cfgs[0].batch_size, "steps": steps, "repeats": repeats,
            "unfused_s": u, "fused_s": f, "unfused_img_s": images / u, "fused_img_s": images / f,
            "unfused_img_s_per_model": images / u / pair.k, "fused_img_s_per_model": images / f / pair.k,
            "ratio": u / f}


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_fused_bench(device="cuda", workloads: dict | None = None, ks=(1, 2, 4, 8, 16), *,
                    amp: str | None = None, steps: int | None = None, repeats: int = 3,
                    log=print) -> dict:
    """Time K fused members against the same K one after another, per workload and K.

    device: "cpu", "cuda" or "cuda:N". workloads: {name: TrainConfig overrides} (default: the
    GPU set on CUDA, the CPU set on the CPU). ks: the K values, in increasing order; on CUDA a
    K that runs out of memory is recorded as {"k": K, "oom": True} and larger ones are skipped.
    amp: "bf16" on CUDA and "off" on the CPU by default. steps: timed steps per member and side
    (default 5 on CUDA, 2 on the CPU). log: called with one line per result (None: silent).
    Returns {"device", "host", "torch", "threads", "loadavg", "amp", "results": [{"workload",
    "k", "batch", "unfused_s", "fused_s", "unfused_img_s", "fused_img_s", "..._per_model",
    "ratio"} ...]}.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    workloads = workloads or (GPU_WORKLOADS if cuda else CPU_WORKLOADS)
    amp = amp or ("bf16" if cuda else "off")
    steps = steps or (5 if cuda else 2)
    out = {"device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
           "host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None, "amp": amp,
           "results": []}
    for name, over in workloads.items():
        for k in ks:
            try:
                r = measure(member_configs(over, k, str(dev), amp), dev, steps, repeats)
            except Exception as e:   # noqa: BLE001 - only memory exhaustion ends a workload early
                if not (cuda and _oom(e)):
                    raise
                torch.cuda.empty_cache()
                out["results"].append({"workload": name, "k": k, "oom": True})
                if log:
                    log(f"{name:14s} K={k:<3d} out of memory: larger K skipped")
                break
            out["results"].append({"workload": name, **r})
            if log:
                log(format_row(name, r))
            if cuda:
                torch.cuda.empty_cache()
    return out


def format_row(name: str, r: dict) -> str:
    return (f"{name:14s} K={r['k']:<3d} unfused {r['unfused_img_s']:8.0f} img/s "
            f"({r['unfused_img_s_per_model']:7.0f} per model)   fused {r['fused_img_s']:8.0f} img/s "
            f"({r['fused_img_s_per_model']:7.0f} per model)   ratio {r['ratio']:5.2f}x")


def profile_fused_step(device="cpu", k: int = 4, rows: int = 15, workload: dict | None = None) -> str:
    """The top ops (self CPU time) of 3 fused demo-CNN steps of K members, next to the same
    steps unfused: what dominates a fused step. Run on one thread, so that the attack is not
    split over worker threads, whose ops the profiler does not see."""
    from torch.profiler import profile
    keep = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = Pair(member_configs(workload or CPU_WORKLOADS["demo-cnn"], k, str(device), "off"), device)
        pair.unfused(1)
        pair.fused_steps(1)
        text = []
        for side, run in (("fused", pair.fused_steps), ("unfused", pair.unfused)):
            with profile() as p:
                run(3)
            text.append(f"--- {side}: 3 steps of {k} members, one thread\n"
                        + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    finally:
        torch.set_num_threads(keep)
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fused", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=None, help="K values (default 1 2 4 8; CUDA 1 2 4 8 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per member and side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--amp", default=None, help="off | bf16 (default: bf16 on CUDA, off on the CPU)")
    p.add_argument("--workload", nargs="+", default=None, help="names of the workloads to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes, K 1 2, one repeat")
    p.add_argument("--profile", action="store_true", help="print the top ops of a fused demo-CNN step (K=4)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    cuda = torch.device(a.device).type == "cuda"
    table = QUICK_WORKLOADS if a.quick else (GPU_WORKLOADS if cuda else CPU_WORKLOADS)
    if a.workload:
        unknown = [w for w in a.workload if w not in table]
        if unknown:
            p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(table)}")
        table = {w: table[w] for w in a.workload}
    ks = a.k or ((1, 2) if a.quick else ((1, 2, 4, 8, 16) if cuda else (1, 2, 4, 8)))
    steps = a.steps or (1 if a.quick else None)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"bench.fused: {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""), flush=True)
    res = run_fused_bench(a.device, table, ks, amp=a.amp, steps=steps, repeats=1 if a.quick else a.repeats,
                          log=lambda line: print(line, flush=True))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if a.profile:
        print(profile_fused_step(a.device, k=2 if a.quick else 4,
                                 workload=QUICK_WORKLOADS["demo-cnn"] if a.quick else None))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
