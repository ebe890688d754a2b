"""Stage H: AutoAttack `apgd` (APGD-CE + APGD-T, standard settings) on the device, fastfat's
implementation against pyautoattack: seconds each, the ratio, and the per-sample agreement."""
from __future__ import annotations

import time

import torch

from fastfat import autoattack
from fastfat.models import build_model
from fastfat.models.fold import fold_bn
from fastfat.runtime import synchronize
from fastfat.seeding import eval_noise_seed

from ..common import batch


def stage_h(data: dict, device, sizes, clock, record) -> str:
    """ResNet18 at stage D's width with BN statistics away from (0, 1), stage D's images and eps,
    labels = the model's own clean predictions (every sample attacked); the standard n_iter (100)
    in the full run, 2 in the smoke run. pyautoattack runs one eps at a time, fastfat all at once."""
    model_name, width = sizes.eval_model
    torch.manual_seed(0)
    model = build_model(model_name, 10, width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    attacked = fold_bn(model.eval().to(device))
    x, _ = batch(sizes.eval_images, device=device)
    with torch.no_grad():
        y = attacked(x).argmax(1)
    eps = list(sizes.eval_eps)
    seeds = [eval_noise_seed(0, 0, "aa", i) for i in range(len(eps))]
    n_iter = 100 if sizes.eval_images >= 256 else 2
    rows = data.setdefault("rows", [])
    out = {}
    for impl in ("fastfat", "pyautoattack"):
        if not clock.allows(10):
            rows.append({"impl": impl, "skipped": "out of the stage's time"})
            continue
        synchronize(device)
        t = time.perf_counter()
        if impl == "fastfat":
            pred = autoattack.run_batch(attacked, x, y, "apgd", eps, seeds, 10, n_iter=n_iter)[1]
        else:
            pred = torch.cat([autoattack.run(attacked, x, y, "apgd", e, s, 10, impl=impl, n_iter=n_iter)[1]
                              for e, s in zip(eps, seeds)])
        synchronize(device)
        out[impl] = pred == y.repeat(len(eps))
        rows.append({"impl": impl, "seconds": time.perf_counter() - t, "images": len(y), "eps": eps,
                     "n_iter": n_iter, "robust": int(out[impl].sum())})
        record.save()
    if len(out) == 2:
        data["ratio"] = rows[-1]["seconds"] / rows[-2]["seconds"]
        data["agree"] = float((out["fastfat"] == out["pyautoattack"]).double().mean())
        data["result"] = f"apgd: pyautoattack / fastfat {data['ratio']:.2f}x, verdicts agree {100 * data['agree']:.1f}%"
        return "ok"
    return "skipped"
