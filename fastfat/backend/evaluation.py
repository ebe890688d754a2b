"""fastfat.evaluate_model: any model's class-wise evaluation (clean, FGSM, PGD-K, C&W, AutoAttack) on
tensors or a DataLoader, through the code `fastfat eval` runs, returning eval.json's records."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..autoattack.standard import check_classes
from ..config import EvalConfig, make_eval_config
from ..errors import UserError
from ..evaluate import evaluate
from ..runtime import resolve_device
from .prepare import attackable, check_eps, check_inputs, check_labels, probe


class _Batches:
    """(x, y) batches on a device, each batch's labels checked against the class count: from
    tensors (sliced in batch_size) or from a loader yielding (x, y) pairs."""

    def __init__(self, x, y, batch_size: int, device, num_classes: int):
        self.src = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)] \
            if y is not None else x
        self.device, self.num_classes = device, num_classes

    def __len__(self) -> int:
        return len(self.src)

    def __iter__(self):
        for item in self.src:
            xb, yb = _pair(item)
            check_labels(yb, self.num_classes)
            yield xb.to(self.device), yb.to(self.device)


def _pair(item):
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)
            and isinstance(item[1], torch.Tensor)):
        raise UserError("the loader must yield (images [N, C, H, W] in [0, 1], labels [N]) pairs")
    return item[0], item[1]


def evaluate_model(model: nn.Module, x, y=None, *, attacks=("clean", "pgd20", "aa"), eps_test=(8 / 255,),
                   num_classes: int | None = None, batch_size: int = 256, device=None, seed: int = 0,
                   fold_bn: bool = True, amp: str = "off", worst_k: int = 3) -> list[dict]:
    """Evaluate any nn.Module class by class, as `fastfat eval` does, and return its records.

    model: [N, C, H, W] in [0, 1] -> logits [N, num_classes] (normalization inside); attacked in
    eval mode, BN-folded where its layers allow, its mode and gradients restored after. x [N, C,
    H, W] in [0, 1] and y [N] int64, or x a DataLoader (y None) yielding such pairs. attacks:
    "clean" (always recorded), fgsm, pgdK, cw, aa (standard AutoAttack), apgd; eps_test: radii in
    (0, 1], pixel units; num_classes: None reads it from the model's output (else it must
    match); seed: the attacks' start noise and AutoAttack's seeds, as `fastfat eval --seed`.

    Returns eval.json's records, clean first: {"attack", "eps", "class_acc" [C], "class_count"
    [C], "avg_acc", "vcra", "worst_acc", "worst_k_acc", "worst_k", "nstd", "class_loss" [C],
    "amp", "tf32"}, aa / apgd with "attack_settings". fastfat.classwise_report(records) prints
    them. Bad input (shapes, labels outside [0, C), eps outside (0, 1], output not [N, C] or
    not finite, too few classes for AutoAttack's targeted attacks) raises ValueError before any
    attack runs."""
    attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    eps_test = [eps_test] if isinstance(eps_test, (int, float)) else list(eps_test)
    eps_test = [check_eps(e) for e in eps_test]
    attacked = [a for a in attacks if str(a).strip().lower() != "clean"]
    cfg = make_eval_config(None, attacks=attacked or ["fgsm"], eps_test=eps_test, batch_size=batch_size,
                           seed=seed, fold_bn=fold_bn, amp=amp, worst_k=worst_k)
    cfg.attacks = cfg.attacks if attacked else []
    return evaluate_with_config(model, x, y, cfg, num_classes=num_classes, device=device)


def evaluate_with_config(model: nn.Module, x, y, cfg: EvalConfig, *, num_classes: int | None = None,
                         device=None, progress: bool = False) -> list[dict]:
    """evaluate_model with a validated EvalConfig (`fastfat eval --model`): cfg.attacks (may be
    empty: clean only), eps_test, batch_size, seed, fold_bn, amp, tf32, worst_k as there."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch nn.Module, got {type(model).__name__}")
    for e in cfg.eps_test:
        check_eps(e)
    model_device = next((p.device for p in model.parameters()), None) or \
        resolve_device("auto" if device is None else str(device))
    if y is None:
        first = _pair(next(iter(x)))
    else:
        check_inputs(x, y)
        first = (x[:cfg.batch_size], y[:cfg.batch_size])
    with attackable(model, first[0].to(model_device), fold=cfg.fold_bn) as (m, _):
        c = probe(m, first[0].to(model_device), first[1].to(model_device), num_classes)
        if y is not None:
            check_labels(y, c)
        for a in cfg.attacks:
            check_classes(a, c)
        run_cfg = dataclasses.replace(cfg, fold_bn=False)   # m is already the folded copy where one fits
        return evaluate(m, _Batches(x, y, cfg.batch_size, model_device, c), run_cfg, c, device=model_device,
                        progress=progress)


def evaluate_weights(model_name: str, weights: str, dataset: str, cfg_overrides: dict, *,
                     width: int | None = None, progress: bool = True) -> tuple[list[dict], EvalConfig]:
    """`fastfat eval --model SPEC --weights FILE --dataset NAME`: the model (a user spec or one of
    fastfat's names) built for the data set, the weights loaded (backend.weights), evaluated on
    the test set as `fastfat eval` evaluates a checkpoint. Returns (records, eval config)."""
    from ..data import build_loader, dataset_info
    from ..models import build_model, canonical_model_name
    from .weights import load_weights
    info = dataset_info(dataset)
    ecfg = make_eval_config(None, **cfg_overrides)
    device = resolve_device(ecfg.device)
    model = build_model(canonical_model_name(model_name), info.num_classes, width=width, in_channels=info.channels)
    load_weights(model, weights)
    from ..config import TrainConfig   # no training run here: its default data_root
    root = ecfg.data_root or TrainConfig.__dataclass_fields__["data_root"].default
    loader = build_loader(ecfg.loader, info.name, "test", data_root=root, download=False,
                          batch_size=ecfg.batch_size, device=device, channels_last=False,
                          limit=ecfg.test_limit, per_class=ecfg.test_per_class)
    records = evaluate_with_config(model.to(device).eval(), loader, None, ecfg, num_classes=info.num_classes,
                                   device=device, progress=progress)
    return records, ecfg
