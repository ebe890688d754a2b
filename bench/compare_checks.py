"""What bench.compare checks besides the clock: that the fast path and the reference compute
the same thing. training_match (float64, same init, batches and attack starts: per-step losses
and final weights), training_drift (fp32/bf16: how far rounding moves the losses) and eval_match
(fp32, same model: class accuracies within one sample). bench/gpu runs them on a GPU too."""
from __future__ import annotations

import torch

from fastfat.data import MemoryLoader
from fastfat.runtime import resolve_device
from fastfat.seeding import epoch_generator
from fastfat.train import Trainer

from .common import reference_stepper, twin_models

# tests/test_train.py's float64 tolerances
LOSS_RTOL, W_RTOL, W_ATOL = 1e-4, 1e-4, 1e-6


# ---------------------------------------------------------------------------------------------
# Training: results match (float64, same batches)

def first_batches(cfg, train_set, steps: int) -> list:
    """The first `steps` augmented batches of the fast loader's epoch 0, as train_epoch sees them
    (on cfg.device)."""
    loader = MemoryLoader(train_set, cfg.batch_size, True, seed=cfg.seed, crop_pad=cfg.crop_pad,
                          flip=cfg.flip, channels_last=cfg.channels_last, device=resolve_device(cfg.device))
    return [b for _, b in zip(range(steps), loader)]


def training_match(cfg, train_set, steps: int) -> dict:
    """Per-step losses and final weights of the fast trainer and ref_train_step from the same
    init, on the same `steps` augmented batches (the fast loader's epoch 0), with the same attack
    noise stream (epoch_generator(seed, 0, "attack")), in float64, on cfg.device."""
    fast_model, ref_model = twin_models(cfg)
    fast_model, ref_model = fast_model.double(), ref_model.double()
    trainer = Trainer(cfg, fast_model)
    ref_step = reference_stepper(cfg, ref_model)
    device = resolve_device(cfg.device)
    g_fast = epoch_generator(cfg.seed, 0, device, "attack")   # as train_epoch and ref_train draw it
    g_ref = epoch_generator(cfg.seed, 0, device, "attack")
    rows = []
    for x, y in first_batches(cfg, train_set, steps):
        x = x.double()
        rows.append((float(trainer.train_step(x, y, g_fast).loss), ref_step(x, y, g_ref)))
    worst_w, close = 0.0, True
    fast_sd = fast_model.state_dict()
    for k, v in ref_model.state_dict().items():
        f = fast_sd[k]
        if v.is_floating_point():
            worst_w = max(worst_w, float((f - v).abs().max()))
            close = close and torch.allclose(f, v, rtol=W_RTOL, atol=W_ATOL)
        else:
            close = close and torch.equal(f, v)
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in rows]
    ok = close and all(r <= LOSS_RTOL for r in rel)
    return {"losses": rows, "loss_rel_diff": max(rel), "weight_max_abs_diff": worst_w,
            "weights_close": close, "match": ok}


def training_drift(cfgs: dict, train_set, steps: int) -> dict:
    """{name: per-step losses} of the reference and of the fast trainer under each config in
    cfgs, all in fp32 from the same init on the same `steps` augmented batches with the same
    attack noise stream: how far each fast variant's fp32/bf16 numbers move from the reference's
    fp32 ones (training_match pins the math; this shows the rounding)."""
    ref_cfg = next(iter(cfgs.values()))
    ref_step = reference_stepper(ref_cfg, twin_models(ref_cfg)[1])
    batches = first_batches(ref_cfg, train_set, steps)
    device = resolve_device(ref_cfg.device)
    g = epoch_generator(ref_cfg.seed, 0, device, "attack")
    out = {"reference": [ref_step(x, y, g) for x, y in batches]}
    for name, c in cfgs.items():
        trainer = Trainer(c, twin_models(c)[0])
        g = epoch_generator(c.seed, 0, device, "attack")
        out[name] = [float(trainer.train_step(x, y, g).loss) for x, y in batches]
    return out



# ---------------------------------------------------------------------------------------------
# Evaluation: results match (fp32, same model)

def eval_match(fast_recs, ref_recs, class_counts) -> dict:
    """Cell by cell: the largest class-accuracy difference in samples, and (for information) the
    largest relative difference of the class-wise mean CE.

    Match: the same cells, and every class accuracy within one sample: the evaluation's results
    (average, VCRA, worst class) are functions of the class accuracies. The CE after an attack
    is not held to a tolerance: sign(grad) turns fp32 rounding differences (channels_last and
    folded BN vs NCHW) into slightly different adversarial examples, which moves the CE of
    misclassified samples by up to about 1% (C&W, which keeps pushing them for 30 steps, a few
    %) without changing a prediction."""
    cells, ok = [], [(r["attack"], r["eps"]) for r in fast_recs] == [(r["attack"], r["eps"]) for r in ref_recs]
    for f, r in zip(fast_recs, ref_recs):
        diff = max(abs(a - b) * n for a, b, n in zip(f["class_acc"], r["class_acc"], class_counts))
        loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(f["class_loss"], r["class_loss"]))
        ok = ok and diff <= 1 + 1e-9
        cells.append({"attack": f["attack"], "eps": f["eps"], "avg_acc_fast": f["avg_acc"],
                      "avg_acc_ref": r["avg_acc"], "max_class_diff_samples": round(diff),
                      "class_loss_max_rel_diff": loss_rel})
    return {"cells": cells, "match": ok}
