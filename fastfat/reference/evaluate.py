"""The reference evaluation (var_acc_test.py): class-wise accuracy under FGSM, PGD-k and CW, and
its summaries."""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn

from ..seeding import eval_noise_seed
from .attacks import ref_cw, ref_fgsm, ref_pgd


def ref_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Per-class accuracy as Python floats, counted class by class; NaN for an absent class."""
    out = []
    for i in range(num_classes):
        mask = y == i
        total = int(mask.sum())
        out.append(int((pred[mask] == i).sum()) / total if total else float("nan"))
    return out


def ref_classwise_loss(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(class mean losses as floats, NaN when absent; np.var (ddof 0) over the present ones)."""
    means = []
    for i in range(num_classes):
        mask = y == i
        means.append(float(per_sample_loss[mask].double().mean()) if bool(mask.any()) else float("nan"))
    present = [m for m in means if not math.isnan(m)]
    return means, float(np.var(present))


def ref_summary(class_acc) -> dict:
    """avg_acc = np.mean, vcra = np.var (population), worst_acc = min, over the present classes."""
    a = np.array([v for v in class_acc if not math.isnan(v)], dtype=np.float64)
    return {"avg_acc": float(np.mean(a)), "vcra": float(np.var(a)), "worst_acc": float(np.min(a))}


def _attack_batch(model, data, target, attack: str, eps: float, kappa: float, generator):
    """One attack of the evaluation protocol on one batch (var_acc_test.py's settings)."""
    if attack == "fgsm":
        return ref_fgsm(model, data, target, eps, generator=generator)
    if attack == "cw":
        return ref_cw(model, data, target, eps, eps / 4, 30, kappa, generator=generator)
    m = re.fullmatch(r"pgd(\d+)", attack)
    if m:
        return ref_pgd(model, data, target, eps, eps / 4, int(m.group(1)), loss="ce", generator=generator)
    raise ValueError(f"unknown attack {attack!r}")


def ref_evaluate(model: nn.Module, test_set, attacks=("fgsm", "pgd20", "cw"), eps_list=(16 / 255, 20 / 255),
                 batch_size: int = 128, seed: int = 0, kappa: float = 50.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 loader: str = "torchvision") -> list[dict]:
    """Clean and robust class-wise accuracy, the authors' way: one pass over the test set per
    (attack, eps), attacks one after another, eps one at a time, model in eval mode.

    test_set: fastfat.data.ImageSet, served sequentially without augmentation by TorchvisionLoader
    (loader "torchvision", the authors' data path) or by MemoryLoader in NCHW (loader "memory": the
    same batches, for a machine without torchvision), each batch moved to `device` (None: the
    model's).
    Returns records {"attack", "eps", "class_acc", "avg_acc", "vcra", "worst_acc", "class_loss"},
    "clean" (eps 0.0) first, then attack-major, eps-minor. fgsm: one step of eps after a random
    start; pgdK: K steps of eps/4; cw: 30 steps of eps/4 with kappa. The start for batch b,
    attack a, eps index e is drawn from torch.Generator(device).manual_seed(eval_noise_seed(seed, b, a, e)).
    dtype: the batches' dtype (float64 with a float64 model, for pinning runs).
    """
    from ..data import MemoryLoader, TorchvisionLoader

    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_classes = test_set.num_classes
    if loader not in ("torchvision", "memory"):
        raise ValueError(f"unknown loader {loader!r}; expected torchvision or memory")
    loader = (TorchvisionLoader(test_set, batch_size, False, device=device) if loader == "torchvision" else
              MemoryLoader(test_set, batch_size, False, device=device, channels_last=False))
    model.eval()
    cells = [("clean", 0, 0.0)] + [(a, e, float(eps)) for a in attacks for e, eps in enumerate(eps_list)]
    records = []
    for attack, eps_index, eps in cells:
        preds, losses, targets = [], [], []
        for batch_index, (data, target) in enumerate(loader):
            data = data.to(dtype)
            if attack != "clean":
                g = torch.Generator(device=device).manual_seed(eval_noise_seed(seed, batch_index, attack, eps_index))
                data = _attack_batch(model, data, target, attack, eps, kappa, g)
            with torch.no_grad():
                output = model(data)
            preds.append(output.max(1)[1])
            losses.append(nn.CrossEntropyLoss(reduction="none")(output, target))
            targets.append(target)
        pred, loss, y = torch.cat(preds), torch.cat(losses), torch.cat(targets)
        class_acc = ref_class_accuracy(pred, y, num_classes)
        class_loss, _ = ref_classwise_loss(loss, y, num_classes)
        records.append({"attack": attack, "eps": eps, "class_acc": class_acc, **ref_summary(class_acc),
                        "class_loss": class_loss})
    return records
