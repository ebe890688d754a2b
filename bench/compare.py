"""Side by side, in one process: fastfat's fast path against the reference (the authors' code
shape, fastfat.reference), for one FAT training epoch and one evaluation pass, with proof that
both compute the same thing.

    python -m bench.compare              # the report (4-5 minutes on an idle 2-core machine)
    python -m bench.compare --quick      # a tiny workload in seconds (the smoke test runs it)
    python -m bench.compare --compile    # also time the fast path under torch.compile
    python -m bench.compare --amp bf16   # also the fast path under bf16 autocast (not the same numbers)

Timing. Each side runs `--repeats` epochs (and evaluations), interleaved fast, ref, ref, fast,
... so that load from other processes falls on both alike; the table shows the median and the
minimum, and the speedup is the ratio of medians. One training step of each side runs first,
untimed, so one-time initialisation (oneDNN primitives, worker threads) is not charged to
either. Both sides use the same torch thread count (`--threads`, default torch's).
- fast: fastfat.train.train_epoch (Trainer: PGD on a BN-folded channels_last copy, input
  gradients only, batch split over the cores; MemoryLoader: data resident as uint8, crop and
  flip in batch);
- reference: fastfat.reference.ref_train (loss.backward() at every attack step, NCHW, BN
  unfolded, torchvision DataLoader with per-sample PIL transforms, per-class Python loop).
With --compile, the compiled fast path's first epoch (compilation included, fresh inductor
cache) is shown apart from its steady-state epochs.

Results. The two sides' timed epochs cannot be compared step by step: their augmentations
draw differently (batched crop/flip vs per-sample PIL transforms), and in fp32 the attack's
sign(grad) turns last-bit differences (channels_last vs NCHW, folded vs unfolded BN) into
different trajectories within a few steps. So the match check feeds both the same init, the
same augmented batches and the same attack start noise, in float64 (as tests/test_train.py),
and compares the per-step losses and the final weights. Evaluation is compared in fp32 on the
same model: its start noise is keyed by (seed, batch, attack, eps), so the class accuracies
must agree up to the rare sample whose prediction a rounding-level sign flip changes.

The last two lines read `fat-epoch speedup: 3.42x (results match)` and
`eval speedup: 2.10x (results match)`, with "(results differ)" when the check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from fastfat import reference
from fastfat.config import make_eval_config
from fastfat.data import MemoryLoader

from .common import fat_config, synthetic32, twin_models
from .compare_checks import LOSS_RTOL, W_ATOL, W_RTOL, eval_match, training_drift, training_match
from .compare_sides import FastSide, RefSide, eval_model, say, time_interleaved

FULL = dict(images=2048, width=16, batch=128, steps=10, repeats=3, match_steps=4,
            eval_images=256, eval_batch=256, eval_repeats=3, attacks="fgsm,pgd20,cw",
            eps_test="4/255,8/255", eval_model_epochs=2)
QUICK = dict(images=128, width=4, batch=32, steps=2, repeats=1, match_steps=2,
             eval_images=32, eval_batch=32, eval_repeats=1, attacks="fgsm,pgd3,cw",
             eps_test="4/255,8/255", eval_model_epochs=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny workload (seconds): smoke test only")
    for k, v in FULL.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None,
                       help=f"default {v} (quick: {QUICK[k]})")
    p.add_argument("--method", default="fat-madry")
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both sides (default: torch's, one per core)")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast path with torch.compile (cold compile counted apart)")
    p.add_argument("--amp", choices=("off", "bf16"), default="off",
                   help="bf16: also time the fast path under bf16 autocast (training and evaluation) "
                        "and show how far its numbers move from the fp32 reference")
    p.add_argument("--json", default=None, help="also write the measurements to this file")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _median_min(ts):
    return statistics.median(ts), min(ts)


def load_average() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------

def say_workload(args, cfg) -> None:
    """The report's first lines: what runs, on what machine."""
    steps_per_epoch = -(-args.images // args.batch)
    say("fastfat: fast path vs reference (the authors' code shape), side by side in one process")
    say(f"workload: {cfg.method} lam {cfg.lam}, {cfg.model} width {cfg.width}, {args.images} synthetic "
        f"32x32x3 images, batch {cfg.batch_size} ({steps_per_epoch} steps/epoch), PGD-{cfg.steps} "
        f"step {cfg.alpha():.4g} eps {cfg.eps_train * 255:.0f}/255, crop pad {cfg.crop_pad} + flip, fp32"
        + (" (and the fast path under bf16 autocast)" if args.amp == "bf16" else ""))
    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads per side; {args.repeats} interleaved repeats, median")


def time_training(args, cfg, train_set) -> dict:
    """One FAT epoch per side, interleaved: {"times": {side: [s]}, "first_compiled": s or None,
    "ccfg": the compiled side's config or None, "amp_cfg": the bf16 side's or None}."""
    fast_model, ref_model = twin_models(cfg)
    fast, ref = FastSide(cfg, fast_model, train_set), RefSide(cfg, ref_model, train_set)
    sides = {"fast": fast.run_epoch, "reference": ref.run_epoch}
    ccfg, first_compiled, amp_cfg = None, None, None
    if args.compile:
        ccfg = fat_config(width=args.width, batch_size=args.batch, steps=args.steps,
                          method=args.method, lam=args.lam, compile=True)
        compiled = FastSide(ccfg, twin_models(ccfg)[0], train_set)
        say("compiled fast path: first epoch, compilation included ...")
        t0 = time.perf_counter()
        compiled.run_epoch()
        first_compiled = time.perf_counter() - t0
        sides["fast+compile"] = compiled.run_epoch
    if args.amp == "bf16":
        amp_cfg = fat_config(width=args.width, batch_size=args.batch, steps=args.steps,
                             method=args.method, lam=args.lam, amp="bf16")
        amp_side = FastSide(amp_cfg, twin_models(amp_cfg)[0], train_set)
        amp_side.warm_up()
        sides["fast+bf16"] = amp_side.run_epoch
    fast.warm_up()
    ref.warm_up()
    say("timing one FAT epoch per side ...")
    times = time_interleaved(sides, args.repeats, "epoch")
    return {"times": times, "first_compiled": first_compiled, "ccfg": ccfg, "amp_cfg": amp_cfg}


def report_training(args, cfg, train_set, run: dict) -> dict:
    """The training table and the float64 match check; result["train"] without "bf16"."""
    say("checking results (float64, same init, same batches, same attack starts) ...")
    match = training_match(cfg, train_set, args.match_steps)
    if args.compile:
        cmatch = training_match(run["ccfg"], train_set, args.match_steps)
        match["match"] = match["match"] and cmatch["match"]
        match["compiled"] = cmatch
    times, first_compiled = run["times"], run["first_compiled"]
    ref_med = statistics.median(times["reference"])
    say("")
    say(f"{'FAT epoch':34s} {'median s':>9s} {'min s':>8s} {'images/s':>9s} {'speedup':>8s}")
    rows = [("reference (reference.ref_train)", "reference"), ("fast (train.train_epoch)", "fast")]
    if args.compile:
        rows.append(("fast + torch.compile", "fast+compile"))
    if run["amp_cfg"] is not None:
        rows.append(("fast + bf16 autocast", "fast+bf16"))
    for title, k in rows:
        med, mn = _median_min(times[k])
        say(f"{title:34s} {med:9.2f} {mn:8.2f} {args.images / med:9.1f} {ref_med / med:7.2f}x")
    if args.compile:
        say(f"{'fast + torch.compile, 1st epoch':34s} {first_compiled:9.2f} {'':8s} "
            f"{args.images / first_compiled:9.1f} {ref_med / first_compiled:7.2f}x  (compilation included)")
    say("")
    say(f"results, training: float64, {len(match['losses'])} steps from the same init on the same augmented "
        f"batches with the same attack starts (the timed fp32 epochs draw different crops/flips per side)")
    say(f"  {'step':>4s}  {'loss fast':>20s}  {'loss reference':>20s}  {'rel diff':>9s}")
    for i, (a, b) in enumerate(match["losses"]):
        say(f"  {i + 1:4d}  {a:20.15f}  {b:20.15f}  {abs(a - b) / max(abs(b), 1e-30):9.1e}")
    say(f"  final weights: max |fast - reference| {match['weight_max_abs_diff']:.1e} "
        f"(allclose rtol {W_RTOL:g} atol {W_ATOL:g}: {match['weights_close']}); "
        f"losses within rel {LOSS_RTOL:g}: {match['loss_rel_diff'] <= LOSS_RTOL}")
    if args.compile:
        c = match["compiled"]
        say(f"  compiled fast path: loss rel diff {c['loss_rel_diff']:.1e}, weights max diff "
            f"{c['weight_max_abs_diff']:.1e}, match {c['match']}")
    return {"times": times, "first_compiled_epoch": first_compiled, "match": match,
            "speedup": ref_med / statistics.median(times["fast"])}


def report_drift(args, cfg, train_set, run: dict) -> dict:
    """With --amp bf16: the fp32 and bf16 fast paths' per-step losses against the reference's;
    result["train"]["bf16"]."""
    ref_med = statistics.median(run["times"]["reference"])
    say("")
    say(f"rounding, training: fp32 inputs, {args.match_steps} steps from the same init on the same batches "
        "and attack starts; per-step loss and its relative difference from the fp32 reference")
    drift = training_drift({"fast": cfg, "fast+bf16": run["amp_cfg"]}, train_set, args.match_steps)
    say(f"  {'step':>4s}  {'reference':>10s}  {'fast fp32':>10s} {'rel diff':>9s}  {'fast bf16':>10s} {'rel diff':>9s}")
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
    for i, r in enumerate(drift["reference"]):
        f, h = drift["fast"][i], drift["fast+bf16"][i]
        say(f"  {i + 1:4d}  {r:10.5f}  {f:10.5f} {rel(f, r):9.1e}  {h:10.5f} {rel(h, r):9.1e}")
    say("  (the float64 check above covers bf16's code path too: autocast leaves float64 alone. In fp32")
    say("  the attack's sign(grad) turns rounding into different adversarial examples, so the runs part")
    say("  within a few steps; bf16 rounds 2^16 times coarser than fp32 and parts from the first step)")
    return {"speedup": ref_med / statistics.median(run["times"]["fast+bf16"]), "drift": drift,
            "first_step_rel_diff": rel(drift["fast+bf16"][0], drift["reference"][0])}


def time_eval(args, train_set, test_set, amp: bool):
    """One evaluation pass per side, interleaved, on a model trained for it: ({side: [s]},
    {side: fastfat.evaluate records})."""
    # imported here: bench.gpu uses this module's training checks on machines where
    # fastfat.evaluate's imports (pyautoattack) may be missing
    from fastfat.evaluate import evaluate
    attacks = args.attacks.split(",")
    ecfg = make_eval_config(None, attacks=attacks, eps_test=args.eps_test.split(","),
                            batch_size=args.eval_batch, seed=0, device="cpu", loader="memory")
    say("")
    say(f"training the model to evaluate ({args.eval_model_epochs} epochs of Madry PGD-3 at eps 16/255, "
        "no augmentation, BN statistics recomputed) ...")
    model = eval_model(args, train_set)
    ref_eval_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    out = {}

    def fast_eval():
        out["fast"] = evaluate(model, MemoryLoader(test_set, ecfg.batch_size, False), ecfg, 10,
                               device="cpu")

    def ref_eval():
        out["reference"] = reference.ref_evaluate(ref_eval_model, test_set, attacks=ecfg.attacks,
                                                  eps_list=ecfg.eps_test, batch_size=ecfg.batch_size,
                                                  seed=ecfg.seed, kappa=ecfg.cw_kappa)

    say(f"timing evaluation: {args.eval_images} test images; clean + {', '.join(ecfg.attacks)} at eps "
        f"{', '.join(f'{e * 255:.0f}/255' for e in ecfg.eps_test)} ...")
    esides = {"fast": fast_eval, "reference": ref_eval}
    if amp:
        def amp_eval():
            out["fast+bf16"] = evaluate(model, MemoryLoader(test_set, ecfg.batch_size, False), ecfg, 10,
                                        device="cpu", amp="bf16")
        esides["fast+bf16"] = amp_eval
    return time_interleaved(esides, args.eval_repeats, "eval"), out


def report_eval(args, test_set, etimes: dict, out: dict, amp: bool) -> dict:
    """The evaluation table and the class-accuracy match; result["eval"]."""
    counts = torch.bincount(test_set.labels, minlength=10).tolist()
    ematch = eval_match(out["fast"], out["reference"], counts)
    eref = statistics.median(etimes["reference"])
    say("")
    say(f"{'evaluation':34s} {'median s':>9s} {'min s':>8s} {'images/s':>9s} {'speedup':>8s}")
    erows = [("reference (reference.ref_evaluate)", "reference"), ("fast (evaluate.evaluate)", "fast")]
    if amp:
        erows.append(("fast + bf16 autocast", "fast+bf16"))
    for title, k in erows:
        med, mn = _median_min(etimes[k])
        say(f"{title:34s} {med:9.2f} {mn:8.2f} {args.eval_images / med:9.1f} {eref / med:7.2f}x")
    say("")
    say("results, evaluation: fp32, same model, same keyed start noise")
    say(f"  {'attack':>8s} {'eps':>7s}  {'avg acc fast':>12s}  {'avg acc ref':>11s}  "
        f"{'max class diff':>14s}  {'class CE rel diff':>17s}")
    for c in ematch["cells"]:
        eps = f"{c['eps'] * 255:.0f}/255" if c["eps"] else "0"
        n = c["max_class_diff_samples"]
        say(f"  {c['attack']:>8s} {eps:>7s}  {100 * c['avg_acc_fast']:11.2f}%  "
            f"{100 * c['avg_acc_ref']:10.2f}%  {n:6d} sample{' ' if n == 1 else 's'}  "
            f"{c['class_loss_max_rel_diff']:17.1e}")
    say("  (match: every class accuracy within one sample. The CE column is information: the attacks'")
    say("  sign(grad) turns fp32 rounding into slightly different adversarial examples, which moves")
    say("  the CE of misclassified samples, not their predictions)")
    result = {"times": etimes, "match": ematch, "speedup": eref / statistics.median(etimes["fast"])}
    if amp:
        amatch = eval_match(out["fast+bf16"], out["reference"], counts)
        worst = max(c["max_class_diff_samples"] for c in amatch["cells"])
        say(f"  bf16 autocast: largest class-accuracy difference from the reference {worst} sample(s) "
            f"in any cell; avg acc " + ", ".join(
                f"{c['attack']} {c['eps'] * 255:.0f}/255 {100 * c['avg_acc_fast']:.2f}%" for c in amatch["cells"][1:]))
        result["bf16"] = {"speedup": eref / statistics.median(etimes["fast+bf16"]), "match": amatch}
    return result


def report_load(load_start: float | None) -> list:
    """The load average at start and end, with a warning when other processes ran."""
    load_end = load_average()
    if load_start is not None and load_end is not None:
        busy = max(load_start, load_end) > (os.cpu_count() or 1) + 0.5
        say("")
        say(f"load average (1 min) at start and end: {load_start:.2f}, {load_end:.2f} on "
            f"{os.cpu_count()} CPUs" + (" -- other processes were running: the reference's OpenMP "
                                        "threads lose more to them than the fast path's split attack, "
                                        "so the speedups above are larger than on an idle machine "
                                        "(bench/README.md)" if busy else ""))
    return [load_start, load_end]


def say_verdicts(result: dict) -> None:
    """The last lines: each speedup with whether the results match (bf16's beside them)."""
    train, ev = result["train"], result["eval"]
    say("")
    if "bf16" in train:
        # bf16 cannot meet the float64 check's tolerance, and its runs part from the reference's
        # at the first step: reported beside the verdicts, never as a match
        b = train["bf16"]
        say(f"with bf16 autocast: fat-epoch speedup {b['speedup']:.2f}x, eval speedup "
            f"{ev['bf16']['speedup']:.2f}x (results differ at bf16's rounding: first-step loss "
            f"rel diff {b['first_step_rel_diff']:.1e}, class accuracies within "
            f"{max(c['max_class_diff_samples'] for c in ev['bf16']['match']['cells'])} sample(s))")
    verdict = lambda ok: "results match" if ok else "results differ"
    say(f"fat-epoch speedup: {train['speedup']:.2f}x ({verdict(train['match']['match'])})")
    say(f"eval speedup: {ev['speedup']:.2f}x ({verdict(ev['match']['match'])})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.compile:
        # count compilation as a user sees it the first time: no inductor cache from earlier runs
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_inductor_"))
    cfg = fat_config(width=args.width, batch_size=args.batch, steps=args.steps, method=args.method,
                     lam=args.lam)
    train_set, test_set = synthetic32(args.images, args.eval_images)
    say_workload(args, cfg)
    load_start = load_average()
    result = {"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}

    run = time_training(args, cfg, train_set)
    result["train"] = report_training(args, cfg, train_set, run)
    amp = run["amp_cfg"] is not None
    if amp:
        result["train"]["bf16"] = report_drift(args, cfg, train_set, run)
    etimes, out = time_eval(args, train_set, test_set, amp)
    result["eval"] = report_eval(args, test_set, etimes, out, amp)
    result["load_average"] = report_load(load_start)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    say_verdicts(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
