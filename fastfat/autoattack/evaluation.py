"""fastfat.AutoAttack's run_standard_evaluation: the checks, the clean pass, each sub-attack in turn
on the samples still robust in batches of bs (as the authors' loop runs them, reseeded per batch),
the authors' log lines, the class-wise records and table, and which attack fooled each sample."""
from __future__ import annotations

import math
import time

import torch

from .. import metrics
from ..backend.prepare import attackable, check_inputs, probe
from ..backend.table import classwise_report
from ..errors import UserError
from .ensemble import CLEAN, ROBUST, run_plan
from .standard import ENSEMBLES, SPEC


def _device(adv, x: torch.Tensor) -> torch.device:
    if adv.device is not None:
        return torch.device(adv.device)
    p = next(adv.model.parameters(), None)
    return p.device if p is not None else x.device


def _attack_name(attacks: list[str]) -> str:
    """The records' attack: aa (the standard ensemble), apgd (its first two), else the list."""
    for name, ens in ENSEMBLES.items():
        if tuple(attacks) == ens:
            return name
    return "+".join(attacks)


def evaluate(adv, x_orig: torch.Tensor, y_orig: torch.Tensor, bs) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, labels) of the AutoAttack `adv` on (x_orig, y_orig); sets adv.fooled_by, .robust,
    .records. All checks (inputs, labels, the model's output, settings) come before any attack."""
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise UserError(f"bs (batch_size) must be an integer >= 1, got {bs!r}")
    check_inputs(x_orig, y_orig)
    dev = _device(adv, x_orig)
    x, y = x_orig.detach().to(dev), y_orig.to(dev)
    with attackable(adv.model, x[:bs]) as (model, how):
        num_classes = probe(model, x, y)
        plan = adv._plan(num_classes)
        adv._log(f"using {adv.version} version including {', '.join(adv.attacks_to_run)}.")
        if how == "as given":
            adv._log("model attacked as given (no BatchNorm folded)")
        with torch.no_grad():
            clean = torch.cat([model(x[i:i + bs].to(next(model.parameters(), x).dtype)).float()
                               for i in range(0, x.shape[0], bs)])
        metrics.check_finite_logits(clean, "the given samples")
        labels = clean.argmax(1)
        robust = labels == y
        by = torch.where(robust, ROBUST, CLEAN)
        adv._log(f"initial accuracy: {float(robust.double().mean()):.2%}")
        x_adv = x.clone()
        t0 = time.time()
        for k, step in enumerate(plan):
            idx = robust.nonzero()[:, 0]
            if idx.numel() == 0:
                adv._log("no robust datapoints left, skipping remaining attacks")
                break
            nb = math.ceil(idx.numel() / bs)
            for b in range(nb):
                rows = idx[b * bs:(b + 1) * bs]
                xa, pred, code = run_plan(model, x[rows], y[rows], [step], [adv.epsilon], [adv.get_seed()],
                                          start=(x[rows], y[rows]))
                hit = code == 0
                done = rows[hit]
                x_adv[done], labels[done] = xa[hit].to(x_adv.dtype), pred[hit]
                robust[done], by[done] = False, k
                adv._log(f"{step[0]} - {b + 1}/{nb} - {int(hit.sum())} out of {rows.numel()} successfully perturbed")
            adv._log(f"robust accuracy after {step[0].upper()}: {float(robust.double().mean()):.2%} "
                     f"(total time {time.time() - t0:.1f} s)")
        with torch.no_grad():
            adv_logits = torch.cat([model(x_adv[i:i + bs].to(clean.dtype)).float() for i in range(0, x.shape[0], bs)])
    res = (x_adv - x).abs().reshape(x.shape[0], -1).max(1)[0]
    adv._log(f"max Linf perturbation: {float(res.max()) if res.numel() else 0.0:.5f}, nan in tensor: "
             f"{int((x_adv != x_adv).sum())}, max: {float(x_adv.max()):.5f}, min: {float(x_adv.min()):.5f}")
    adv._log(f"robust accuracy: {float(robust.double().mean()):.2%}")
    names = [s[0] for s in plan]
    adv.fooled_by = [None if b == ROBUST else "clean" if b == CLEAN else names[b] for b in by.tolist()]
    adv.robust = robust.to(x_orig.device)
    adv.records = _records(adv, clean, adv_logits, robust, y, num_classes, _attack_name(names), plan)
    if adv.verbose:
        adv._log(classwise_report(adv.records, print_it=False))
    return x_adv.to(x_orig.device, x_orig.dtype), labels.to(y_orig.device)


def _records(adv, clean, adv_logits, robust, y, num_classes, attack, plan) -> list[dict]:
    """eval.json-style records: clean and the ensemble at eps (class_acc, class_count, the
    summaries of metrics.summarize, class_loss on the returned examples, attack_settings)."""
    def rec(name, eps, hits, logits):
        # a hit as the label itself, a miss as -1: class_correct counts per class
        correct, total = metrics.class_correct(torch.where(hits, y, -1), y, num_classes)
        acc = (correct / total).tolist()
        loss, _ = metrics.classwise_loss(torch.nn.functional.cross_entropy(logits, y, reduction="none"), y,
                                      num_classes)
        return {"attack": name, "eps": eps, "class_acc": [a if math.isfinite(a) else None for a in acc],
                "class_count": [int(t) for t in total.tolist()], **metrics.summarize(acc),
                "class_loss": [v if math.isfinite(v) else None for v in loss.tolist()]}
    from .. import __version__
    settings = {"implementation": "fastfat", "package": "fastfat", "version": __version__,
                "spec": SPEC, "norm": "Linf", "attacks": [s[0] for s in plan],
                "seed": adv.seed, **{f"{n}:{k}": v for n, kw, r in plan for k, v in {**kw, "restarts": r}.items()}}
    out = [rec("clean", 0.0, clean.argmax(1) == y, clean), rec(attack, adv.epsilon, robust, adv_logits)]
    out[1]["attack_settings"] = settings
    return out
