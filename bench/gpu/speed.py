"""Stages C, D and F: FAT training steps and PGD evaluation, fast path against the reference, in
images/s, with GPU-busy time beside wall time; and (F, last) the torch.compile'd step.

C times one FAT step (fat-madry, lambda 0.5, the authors' PGD-10, SGD) per workload and variant
on one fixed batch: reference fp32 (reference.ref_train_step: loss.backward() in the attack,
NCHW, BN unfolded), fast fp32, fast bf16 autocast, fast bf16 + cudnn.benchmark. TF32 is off
unless a row says so (every row records the flags). A FAT epoch is these steps back to back
(the data already on the GPU), so their ratio is the epoch's up to data loading. FLOPs per step
are counted once per workload (convolutions and matmuls, torch.utils.flop_counter's rules), so
each row also shows its rate and the fraction of stage A's bf16 matmul ceiling it reaches.
D times one evaluation pass (clean + PGD-20 at each eps_test) of the same model, fast fp32 /
bf16 against reference.ref_evaluate, in images x eps per second, and checks fp32 fast against
the reference (every class accuracy within one sample, as bench.compare).
"""
from __future__ import annotations

import importlib.util
import time

import torch

from fastfat import kernels, reference
from fastfat.config import make_eval_config
from fastfat.data import MemoryLoader
from fastfat.models.fold import fold_bn
from fastfat.runtime import set_backends, synchronize
from fastfat.train import Trainer

from ..common import batch, fat_config, reference_stepper, synthetic32, twin_models
from ..compare_checks import eval_match
from .util import gpu_busy, guarded, time_calls

VARIANTS = (("reference fp32", "ref", dict(amp="off")),
            ("fast fp32", "fast", dict(amp="off")),
            ("fast bf16", "fast", dict(amp="bf16")),
            ("fast bf16 + cudnn.benchmark", "fast", dict(amp="bf16", cudnn_benchmark=True)))


def count_flops(cfg, x, y, device) -> float:
    """Floating-point operations of one fast fp32 FAT step (bench.profile's counter)."""
    from ..profile import CountFlops
    trainer = Trainer(cfg, twin_models(cfg)[0])
    with CountFlops() as c:
        trainer.train_step(x.contiguous(memory_format=torch.channels_last), y, torch.Generator(device).manual_seed(0))
    synchronize(device)
    return float(c.total)


def _stepper(kind, cfg, x, y, device, trainer=None):
    fast_model, ref_model = twin_models(cfg)
    gen = torch.Generator(device).manual_seed(0)
    if kind == "ref":
        set_backends(device, tf32=cfg.tf32, cudnn_benchmark=cfg.cudnn_benchmark)
        step = reference_stepper(cfg, ref_model)
        return lambda: step(x, y, gen)
    trainer = trainer or Trainer(cfg, fast_model)
    xc = x.contiguous(memory_format=torch.channels_last)
    return lambda: trainer.train_step(xc, y, gen)


def _time_row(run, batch_n, device, sizes, flops, ceiling, warmup=1) -> dict:
    kernels.reset_fallback_counts()
    t = time_calls(run, device, sizes.timed_steps, warmup=warmup)
    # a fast row timed while kernels fell back to the torch twins is not the fast path's number
    out = {"images_per_s": batch_n / t["wall_s"], **t, **gpu_busy(run, device),
           "fallbacks": kernels.fallback_counts()}
    if flops:
        out["TFLOP_per_s"] = flops / t["wall_s"] / 1e12
        if ceiling:
            out["fraction_of_bf16_matmul"] = out["TFLOP_per_s"] / ceiling
    return out


def stage_c(data: dict, device, sizes, clock, record, ceiling) -> str:
    rows = data.setdefault("rows", [])
    data["flops_per_step"] = {}
    for label, model, width, batch_n in sizes.workloads:
        x, y = batch(batch_n, device=device)
        base = dict(model=model, width=width, batch_size=batch_n, steps=sizes.attack_steps, device=str(device))
        flops = None
        if clock.allows(20):
            try:
                flops = data["flops_per_step"][label] = count_flops(fat_config(**base), x, y, device)
            except Exception as e:  # noqa: BLE001 - the rates are then left out
                data["flops_per_step"][label] = f"{type(e).__name__}: {e}"
        for name, kind, over in VARIANTS:
            row = {"workload": label, "variant": name, "batch": batch_n}
            if not clock.allows(5):
                rows.append({**row, "skipped": "out of the stage's time"})
                continue
            cfg = fat_config(**base, **over)
            guarded(rows, row, lambda: _time_row(_stepper(kind, cfg, x, y, device), batch_n, device, sizes, flops,
                                                 ceiling, warmup=2 if cfg.cudnn_benchmark else 1), record)
        set_backends(device, tf32=False, cudnn_benchmark=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "ok" if all("error" not in r and (r["variant"].startswith("reference") or not r.get("fallbacks"))
                       for r in rows) else "failed"


def stage_d(data: dict, device, sizes, clock, record) -> str:
    from fastfat.evaluate import evaluate   # here: its imports (pyautoattack) may be missing on a GPU machine
    model_name, width = sizes.eval_model
    cfg = fat_config(model=model_name, width=width, device=str(device))
    fast_model, ref_model = twin_models(cfg)
    fast_model.eval(), ref_model.eval()
    _, test_set = synthetic32(0, sizes.eval_images)
    n_eps = len(sizes.eval_eps)
    loader = "torchvision" if importlib.util.find_spec("torchvision") else "memory"
    data["reference_loader"] = loader
    rows = data.setdefault("rows", [])
    out = {}

    def fast(amp):
        ecfg = make_eval_config(None, attacks=[sizes.eval_attack], eps_test=list(sizes.eval_eps),
                                batch_size=sizes.eval_batch, seed=0, device=str(device), amp=amp, tf32=False)
        return lambda: out.__setitem__(amp, evaluate(fast_model, MemoryLoader(test_set, ecfg.batch_size, False, device=device),
                                                     ecfg, 10, device=device))

    def ref():
        set_backends(device, tf32=False)
        out["reference"] = reference.ref_evaluate(ref_model, test_set, attacks=[sizes.eval_attack],
                                                  eps_list=list(sizes.eval_eps), batch_size=sizes.eval_batch,
                                                  seed=0, device=device, loader=loader)

    def timed(run) -> dict:
        run()                                     # warm-up (cuDNN plans, Triton compiles)
        synchronize(device)
        kernels.reset_fallback_counts()
        t0 = time.perf_counter()
        run()
        synchronize(device)
        s = time.perf_counter() - t0
        return {"seconds": s, "images_x_eps_per_s": sizes.eval_images * n_eps / s,
                "fallbacks": kernels.fallback_counts()}

    for name, run in (("reference fp32", ref), ("fast fp32", fast("off")), ("fast bf16", fast("bf16"))):
        if not clock.allows(10):
            rows.append({"variant": name, "skipped": "out of the stage's time"})
            continue
        guarded(rows, {"variant": name, "attack": sizes.eval_attack, "images": sizes.eval_images,
                       "eps": list(sizes.eval_eps)}, lambda: timed(run), record)
    if "off" in out and "reference" in out:
        counts = torch.bincount(test_set.labels, minlength=10).tolist()
        data["fp32_match"] = eval_match(out["off"], out["reference"], counts)
        if "bf16" in out:
            data["bf16_vs_reference (information)"] = eval_match(out["bf16"], out["reference"], counts)
    ok = all("error" not in r and (r["variant"].startswith("reference") or not r.get("fallbacks")) for r in rows) \
        and data.get("fp32_match", {}).get("match", False)
    return "ok" if ok else "failed"


def stage_f(data: dict, device, sizes, clock, record, ceiling, graphs: bool) -> str:
    """torch.compile: zero fallbacks in a compiled FAT step (stage B's compiled half), its speed
    beside stage C's rows for the first workload, and with graphs CUDA graphs through
    torch.compile(mode="reduce-overhead") for both the training model and the attack copy."""
    if device.type != "cuda":
        data["skipped"] = "torch.compile on a CPU takes minutes per model: not in the smoke run"
        return "skipped"
    label, model, width, batch_n = sizes.workloads[0]
    x, y = batch(batch_n, device=device)
    base = dict(model=model, width=width, batch_size=batch_n, steps=sizes.attack_steps, device=str(device), amp="bf16")
    rows = data.setdefault("rows", [])
    modes = [("fast bf16 + torch.compile", None)] + ([("fast bf16 + compile reduce-overhead (CUDA graphs)",
                                                       "reduce-overhead")] if graphs else [])
    for name, mode in modes:
        if not clock.allows(90):
            rows.append({"workload": label, "variant": name, "skipped": "out of time (compiling takes a minute or more)"})
            continue

        def run_mode(mode=mode):
            cfg = fat_config(**base, compile=mode is None)
            trainer = Trainer(cfg, twin_models(cfg)[0])
            if mode is not None:
                trainer.forward = torch.compile(trainer.model, mode=mode)
                trainer._folded = fold_bn(trainer.model, dtype=trainer.amp)
                trainer._attack_forward = torch.compile(trainer._folded, mode=mode)
            run = _stepper("fast", cfg, x, y, device, trainer=trainer)
            kernels.reset_fallback_counts()
            t0 = time.perf_counter()
            run()
            synchronize(device)
            first = time.perf_counter() - t0
            fb = kernels.fallback_counts()
            return {"first_step_s (compilation)": first, "fallbacks": fb, "zero_fallbacks": not fb,
                    **_time_row(run, batch_n, device, sizes, None, ceiling)}
        guarded(rows, {"workload": label, "variant": name, "batch": batch_n}, run_mode, record)
    ok = all("error" not in r and r.get("zero_fallbacks", True) for r in rows)
    return "ok" if ok else "failed"
