"""Where the time of one FAT training step goes, fast path and reference side by side.

    python -m bench.profile                 # ResNet18 width 16, batch 128, PGD-10, 1 thread
    python -m bench.profile --threads 2     # with torch's intra-op threads (and the split attack)
    python -m bench.profile --ablation      # one attack step, the levers added one at a time
    python -m bench.profile --amp bf16      # the fast step under bf16 autocast
    python -m bench.profile --convs         # each convolution alone: the floor under a fast step

torch.profiler records one step of each side after a warm-up step; the table sums the ops'
self CPU time into categories (convolution forward / backward, batch
norm, ReLU and residual adds, loss and class statistics, PGD update, optimizer, other), and
the phases (attack, training forward + backward, optimizer) by wall time, and the floating-point
work of each step (torch.utils.flop_counter: convolutions and matmuls) with the rate attained. With --threads > 1
only the phases are shown: the profiler does not record the attack's worker threads. Loading one batch
is timed on its own: MemoryLoader (resident uint8, batched crop/flip) against the
TorchvisionLoader the reference trains from (per-sample PIL transforms).
One thread by default: the numbers are then stable on a shared machine and add up to the step.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastfat import reference
from fastfat.data import MemoryLoader, TorchvisionLoader
from fastfat.train import Trainer

from .common import batch, fat_config, reference_stepper, synthetic32, twin_models

CATEGORIES = [   # (title, substrings of aten op names), first match wins
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "aten::convolution", "_convolution", "conv2d")),
    ("batch norm", ("batch_norm",)),
    ("ReLU, residual add", ("clamp_min", "relu", "threshold_backward", "aten::add", "aten::add_")),
    ("loss, class stats", ("softmax", "nll_loss", "cross_entropy", "index_add", "bincount", "aten::var",
                           "aten::mean", "aten::sum", "masked", "index", "nonzero", "item",
                           "_local_scalar_dense", "any")),
    ("PGD update", ("sign", "minimum", "maximum", "clamp", "aten::min", "aten::max", "uniform_")),
    ("optimizer", ("_foreach", "sgd")),
    ("pooling, linear", ("pool", "addmm", "aten::mm", "linear")),
    ("copies, layout", ("copy_", "contiguous", "clone", "to_copy", "empty", "zero_", "fill_")),
]


def categorise(prof) -> dict:
    out = defaultdict(float)
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        name = ev.key.lower()
        for title, keys in CATEGORIES:
            if any(k.lower() in name for k in keys):
                out[title] += ev.self_cpu_time_total / 1e6
                break
        else:
            out["other"] += ev.self_cpu_time_total / 1e6
    return out


class CountFlops(TorchDispatchMode):
    """Floating-point operations of the ops torch.utils.flop_counter knows (convolutions forward
    and backward, matmuls), summed. Not FlopCounterMode itself: its module tracker's hooks reject
    torch.autograd.grad on a leaf, which is how the attack asks for its input gradient."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def phase(times: dict, name: str):
    t0 = time.perf_counter()
    with record_function(name):
        yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def ablation(args) -> int:
    """One attack step (forward + input gradient) with the levers added one at a time, timed
    interleaved (median of --repeats) so the ratios are comparable."""
    import copy

    import torch.nn.functional as F

    from fastfat.models.fold import fold_bn

    cfg = fat_config(width=args.width, batch_size=args.batch)
    fast_model, ref_model = twin_models(cfg)
    ref_model.eval()
    x, y = batch(args.batch)
    xc = x.contiguous(memory_format=torch.channels_last)
    cl_model = copy.deepcopy(fast_model).eval()
    folded = fold_bn(fast_model)

    def full_backward():        # the reference: every parameter gradient too
        xa = x.detach().requires_grad_(True)
        ref_model.zero_grad()
        F.cross_entropy(ref_model(xa), y).backward()

    def input_grad(model, inp, target=y):
        def run():
            xa = inp.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xa), target, reduction="sum"), xa)
        return run

    variants = {
        "reference: NCHW, BN, loss.backward()": full_backward,
        "+ input gradient only": input_grad(ref_model, x),
        "+ channels_last": input_grad(cl_model, xc),
        "+ BN folded into the convs": input_grad(folded, xc),
    }
    chunk = 64
    slices = [input_grad(folded, xc[i:i + chunk], y[i:i + chunk]) for i in range(0, args.batch, chunk)]
    variants[f"+ {chunk}-sample slices, one after another"] = lambda: [run() for run in slices]
    if args.threads > 1:
        from fastfat import runtime
        variants[f"+ split over {args.threads} 1-thread workers"] = lambda: runtime.sharded(
            lambda sl: input_grad(folded, xc[sl], y[sl])(), args.batch, args.threads, chunk)
    if args.compile:
        variants["+ torch.compile (whole batch)"] = input_grad(torch.compile(folded), xc)

    def bf16_grad():            # not the same numbers: bf16 rounding
        xa = xc.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = folded(xa)
        torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xa)
    variants["+ bf16 autocast (bf16 rounding)"] = bf16_grad
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    print(f"one attack step (forward + input gradient): {cfg.model} width {cfg.width}, batch {args.batch}, "
          f"32x32, {args.threads} torch thread(s), median of {args.repeats}")
    base = statistics.median(times[next(iter(times))])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:40s} {1000 * m:8.1f} ms  {base / m:5.2f}x")
    return 0


def conv_floor(args) -> int:
    """Each convolution of the attacked model timed alone (forward, and input gradient via
    aten.convolution_backward), fp32 and bf16, at the attack's slice size: the time a fast FAT
    step would take if it did nothing but these convolutions at oneDNN's own speed for each
    shape, against one reference step timed here."""
    import torch.nn.functional as F

    from fastfat.models.fold import fold_bn

    cfg = fat_config(width=args.width, batch_size=args.batch, steps=args.steps)
    fast_model, ref_model = twin_models(cfg)
    folded = fold_bn(fast_model)
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape), m)))
             for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    chunk = min(64, args.batch)   # the attack's slice (runtime.CHUNK_PIXELS at 32x32)
    with torch.no_grad():
        folded(batch(chunk)[0].contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()

    def median_time(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    total = {torch.float32: [0.0, 0.0], torch.bfloat16: [0.0, 0.0]}   # seconds: forward, input grad
    flops = 0
    print(f"each convolution alone, {chunk}-sample slice, channels_last, {args.threads} thread(s): "
          "GFLOP/s forward / input gradient")
    print(f"  {'input':>18s} {'weight':>16s} {'stride':>6s} {'fp32':>13s} {'bf16':>13s}")
    for in_shape, m in shapes:
        w = m.weight.detach()
        x = torch.randn(in_shape).contiguous(memory_format=torch.channels_last)
        out = F.conv2d(x, w, None, m.stride, m.padding)
        f = 2 * out.numel() * w[0].numel()
        flops += f
        row = []
        for dt in total:
            xd, wd = x.to(dt), w.to(dt).contiguous(memory_format=torch.channels_last)
            g = torch.randn_like(out, dtype=dt)
            fwd = median_time(lambda: F.conv2d(xd, wd, None, m.stride, m.padding))
            bwd = median_time(lambda: torch.ops.aten.convolution_backward(
                g, xd, wd, None, list(m.stride), list(m.padding), [1, 1], False, [0, 0], 1,
                [True, False, False]))
            total[dt][0] += fwd
            total[dt][1] += bwd
            row.append(f"{f / fwd / 1e9:5.0f} / {f / bwd / 1e9:5.0f}")
        print(f"  {str(list(in_shape)):>18s} {str(list(w.shape)):>16s} {m.stride[0]:6d} {row[0]:>13s} {row[1]:>13s}")
    x, y = batch(args.batch)
    ref_step = reference_stepper(cfg, ref_model)
    ref = median_time(lambda: ref_step(x, y, torch.Generator().manual_seed(0)), n=3)
    scale = args.batch / chunk
    print(f"\none FAT step, batch {args.batch}, PGD-{cfg.steps}: {cfg.steps} x (forward + input gradient) "
          "for the attack, and about 3 forwards' worth for training (forward, input and weight gradients)")
    print(f"  reference step, measured here: {ref:.3f} s")
    for dt, (fwd, bwd) in total.items():
        floor = scale * (cfg.steps * (fwd + bwd) + 3 * fwd)
        print(f"  {str(dt).split('.')[-1]:8s} convolutions alone: {floor:.3f} s per step "
              f"({flops / fwd / 1e9:.0f} GFLOP/s forward overall), so at most {ref / floor:.2f}x the reference")
    return 0


def parse_args(argv=None):
    """The command line; see --help."""
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ablation", action="store_true",
                   help="time one attack step with the levers added one at a time instead")
    p.add_argument("--compile", action="store_true", help="ablation: also the torch.compile'd step")
    p.add_argument("--repeats", type=int, default=7, help="ablation: interleaved repeats")
    p.add_argument("--convs", action="store_true",
                   help="time each convolution alone (fp32 and bf16): the floor under a fast step")
    p.add_argument("--amp", choices=("off", "bf16"), default="off",
                   help="the fast step under bf16 autocast (not the reference's numbers)")
    return p.parse_args(argv)


def step_functions(args, cfg):
    """(trainer, fast_step, ref_step, ref_phases, timed_ref_pgd): one FAT step of each side on
    the same batch, each step(times) adding its phases' wall seconds to `times`; the reference's
    attack is timed into ref_phases while the reference's training step calls timed_ref_pgd
    (fastfat.reference.train.ref_pgd, the name ref_train_step looks up)."""
    fast_model, ref_model = twin_models(cfg)
    x, y = batch(args.batch)
    xc = x.contiguous(memory_format=torch.channels_last)

    # --- fast: the trainer's step, split into its phases ---
    trainer = Trainer(cfg, fast_model)

    def fast_step(times):
        with phase(times, "BN fold refresh"):
            folded = trainer.attack_model()
        with phase(times, "attack (PGD)"):
            from fastfat import attacks
            x_adv = attacks.pgd(folded, xc, y, cfg.eps_train, cfg.alpha(), cfg.steps,
                                generator=torch.Generator().manual_seed(0), amp=trainer.amp)
        with phase(times, "train forward + loss + backward"):
            trainer.model.train()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss, _ = trainer.loss(xc, y, x_adv)
            loss.backward()
        with phase(times, "optimizer step"):
            trainer.optimizer.step()

    # --- reference: ref_train_step, with its attack timed apart ---
    run_ref = reference_stepper(cfg, ref_model)
    ref_phases: dict = {}
    inner_ref_pgd = reference.ref_pgd

    def timed_ref_pgd(*a, **k):
        with phase(ref_phases, "attack (PGD)"):
            return inner_ref_pgd(*a, **k)

    def ref_step(times):
        with phase(times, "whole step"):
            run_ref(x, y, torch.Generator().manual_seed(0))

    return trainer, fast_step, ref_step, ref_phases, timed_ref_pgd


def profile_steps(args, fast_step, ref_step, ref_phases: dict, timed_ref_pgd):
    """A warm-up step of each side (counting its FLOPs with one thread), then one profiled step:
    (flops {side: FLOPs or None}, profilers {side: ...}, phases {side: {phase: s}})."""
    fast_phases: dict = {}
    inner_ref_pgd = reference.train.ref_pgd
    reference.train.ref_pgd = timed_ref_pgd
    try:
        flops = {}
        for side, step in (("fast", fast_step), ("reference", ref_step)):
            # doubles as the warm-up step; the counter does not see the attack's worker threads
            counter = CountFlops() if args.threads == 1 else contextlib.nullcontext()
            with counter:
                step({})
            flops[side] = counter.total if args.threads == 1 else None
        ref_phases.clear()
        profs = {}
        with profile(activities=[ProfilerActivity.CPU]) as profs["fast"]:
            fast_step(fast_phases)
        with profile(activities=[ProfilerActivity.CPU]) as profs["reference"]:
            ref_step(ref_phases)
    finally:
        reference.train.ref_pgd = inner_ref_pgd
    ref_phases["train forward + loss + backward + optimizer"] = (
        ref_phases.pop("whole step") - ref_phases["attack (PGD)"])
    return flops, profs, {"fast": fast_phases, "reference": ref_phases}


def load_times(args) -> dict:
    """{side: seconds to load one batch}: MemoryLoader against TorchvisionLoader, crop + flip."""
    data = synthetic32(4 * args.batch)[0]
    loaders = {"fast": MemoryLoader(data, args.batch, True, crop_pad=4, flip=True),
               "reference": TorchvisionLoader(data, args.batch, True, crop_pad=4, flip=True)}
    load = {}
    for k, loader in loaders.items():
        next(iter(loader))
        t0 = time.perf_counter()
        n = sum(1 for _ in loader)
        load[k] = (time.perf_counter() - t0) / n
    return load


def print_phases(args, cfg, trainer, phases: dict, load: dict, flops: dict) -> None:
    """The workload, then each side's phases with their share of the step and its FLOP rate."""
    print(f"one FAT step: {cfg.method} lam {cfg.lam}, {cfg.model} width {cfg.width}, batch {cfg.batch_size}, "
          f"PGD-{cfg.steps}, 32x32, {args.threads} torch thread(s), fast path "
          f"{'bf16 autocast' if trainer.amp else 'fp32'}")
    print("\nphases (wall seconds)")
    for side, side_phases in phases.items():
        total = sum(side_phases.values())
        print(f"  {side}: {total:.3f} s per step + {load[side]:.3f} s to load the batch")
        for k, v in side_phases.items():
            print(f"    {k:44s} {v:7.3f} s  {100 * v / total:5.1f}%")
        if flops[side] is not None:
            print(f"    floating-point work: {flops[side] / 1e9:.1f} GFLOP per step, "
                  f"{flops[side] / total / 1e9:.0f} GFLOP/s attained")


def print_categories(profs: dict) -> None:
    """Self CPU seconds per op category (CATEGORIES), fast against reference."""
    cats = {k: categorise(v) for k, v in profs.items()}
    print("\nops by category (self CPU seconds)")
    print(f"  {'category':24s} {'fast':>8s} {'reference':>10s}")
    titles = [t for t, _ in CATEGORIES] + ["other"]
    for t in titles:
        f, r = cats["fast"].get(t, 0.0), cats["reference"].get(t, 0.0)
        if f or r:
            print(f"  {t:24s} {f:8.3f} {r:10.3f}")
    print(f"  {'total':24s} {sum(cats['fast'].values()):8.3f} {sum(cats['reference'].values()):10.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ablation:
        return ablation(args)
    if args.convs:
        return conv_floor(args)
    cfg = fat_config(width=args.width, batch_size=args.batch, steps=args.steps, amp=args.amp)
    trainer, *steps = step_functions(args, cfg)
    flops, profs, phases = profile_steps(args, *steps)
    print_phases(args, cfg, trainer, phases, load_times(args), flops)
    if args.threads > 1:
        # the profiler does not see the attack's worker threads: the op table would be partial
        print("\n(op categories: run with --threads 1; the profiler misses the attack's worker threads)")
        return 0
    print_categories(profs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
