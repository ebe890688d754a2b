"""Stage B: correctness on the device. Triton serves CUDA tensors; one FAT step (fp32 and bf16)
runs with no fallback to a torch twin; the fast trainer matches the reference in float64 over a
few steps (the same check as bench.compare and tests/test_train.py, on the device); the first
fp32 step agrees with TF32 off (the attack's examples and the loss; and, shown beside it, how
far TF32 moves them); bf16's drift
from the fp32 reference, step by step. (The compiled half of the zero-fallback check is stage F:
compiling takes minutes, so it runs last.)"""
from __future__ import annotations

import math

import torch

from fastfat import kernels, reference
from fastfat.runtime import set_backends, synchronize
from fastfat.seeding import epoch_generator
from fastfat.train import Trainer

from ..common import fat_config, reference_stepper, synthetic32, twin_models
from ..compare_checks import first_batches, training_drift, training_match

# fp32 first step: the attack's examples agree on 99.9% of pixels (tests/test_attacks.py: the rest
# are sign flips of gradient entries that are zero up to rounding, which then move the step's
# loss by ~1e-5); the loss within 1e-4. Weight differences are shown, not checked: batch-norm
# parameter gradients are cancellations, so a flipped pixel moves them by percents.
FP32_XADV_AGREE, FP32_LOSS_RTOL = 0.999, 1e-4


def _cfg(device, sizes, **over):
    base = dict(width=sizes.check_width, batch_size=sizes.check_batch, steps=sizes.attack_steps, device=str(device))
    return fat_config(**{**base, **over})


def zero_fallback_step(cfg, train_set, device) -> dict:
    """One FAT training step of cfg with the fallback counter reset first: {"ok", "fallbacks",
    "loss"}; ok when nothing ran on a twin and the loss is finite."""
    trainer = Trainer(cfg, twin_models(cfg)[0])
    x, y = first_batches(cfg, train_set, 1)[0]
    kernels.reset_fallback_counts()
    loss = float(trainer.train_step(x, y, epoch_generator(cfg.seed, 0, device, "attack")).loss)
    synchronize(device)
    fb = kernels.fallback_counts()
    return {"ok": not fb and math.isfinite(loss), "fallbacks": fb, "loss": loss, "amp": cfg.amp,
            "compile": cfg.compile}


def first_step_fp32(cfg, train_set, device) -> dict:
    """One fp32 step, fast and reference, from the same weights, batch and attack start: the
    fraction of equal adversarial pixels, the loss, and (shown) the weights after."""
    fast_model, ref_model = twin_models(cfg)
    trainer = Trainer(cfg, fast_model)            # sets TF32 as cfg.tf32 for both sides
    ref_step = reference_stepper(cfg, ref_model)
    x, y = first_batches(cfg, train_set, 1)[0]
    gen = lambda: epoch_generator(cfg.seed, 0, device, "attack")
    x_fast = trainer.adversarial(x, y, gen())
    x_ref = reference.ref_pgd(ref_model, x.contiguous(), y, cfg.eps_train, cfg.alpha(), cfg.steps, generator=gen())
    agree = float((x_fast == x_ref).float().mean())
    lf = float(trainer.train_step(x, y, gen()).loss)
    lr = ref_step(x, y, gen())
    fsd, worst = fast_model.state_dict(), 0.0
    for k, v in ref_model.state_dict().items():
        if v.is_floating_point():
            worst = max(worst, float((fsd[k] - v).abs().max()))
    rel = abs(lf - lr) / max(abs(lr), 1e-30)
    return {"tf32": cfg.tf32, "x_adv_equal_fraction": agree, "loss_fast": lf, "loss_reference": lr,
            "loss_rel_diff": rel, "weight_max_abs_diff (information)": worst,
            "ok": agree >= FP32_XADV_AGREE and rel <= FP32_LOSS_RTOL}


def stage_b(data: dict, device: torch.device, sizes, clock, record) -> str:
    checks = data.setdefault("checks", {})
    backend = kernels.backend(torch.empty(1, device=device))
    checks["triton_active"] = {"ok": backend == "triton", "backend": backend,
                               "import_error": list(getattr(kernels, "_TRITON_IMPORT_ERROR", []))}
    record.save()
    train_set, _ = synthetic32(sizes.check_batch * sizes.match_steps)
    for amp in ("off", "bf16"):
        checks[f"zero_fallbacks_eager_{amp}"] = zero_fallback_step(_cfg(device, sizes, amp=amp), train_set, device)
        record.save()
    m = training_match(_cfg(device, sizes), train_set, sizes.match_steps)
    checks["float64_match"] = {"ok": m["match"], **m}
    record.save()
    steps3 = dict(steps=3, method="fat-madry", lam=1.0)       # as tests/test_train.py's fp32 check
    checks["fp32_first_step_tf32_off"] = first_step_fp32(_cfg(device, sizes, **steps3), train_set, device)
    if device.type == "cuda":
        info = first_step_fp32(_cfg(device, sizes, tf32=True, **steps3), train_set, device)
        info.pop("ok")                              # shown, not checked: TF32 is not fp32
        checks["fp32_first_step_tf32_on (information)"] = info
        set_backends(device, tf32=False)
    record.save()
    drift = training_drift({"fast fp32": _cfg(device, sizes), "fast bf16": _cfg(device, sizes, amp="bf16")},
                           train_set, sizes.match_steps)
    ref = drift["reference"]
    checks["bf16_drift (information)"] = {
        "losses": drift, "rel_diff_per_step": {k: [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(v, ref)]
                                               for k, v in drift.items() if k != "reference"}}
    return "ok" if all(c.get("ok", True) for c in checks.values()) else "failed"
