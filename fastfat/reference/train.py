"""The reference training step and loop (pgd_var.py / trades_var.py's train) and the lr schedules."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..seeding import epoch_generator
from .attacks import ref_fgsm_rs, ref_nfgsm, ref_pgd, working_copy
from .losses import ref_fat_loss, ref_fat_trades_loss, ref_trades_loss


# the methods ref_train_step implements (the authors' code: Madry, TRADES, FAT on both; natural)
METHODS = ("natural", "madry", "trades", "fat-madry", "fat-trades")


def ref_lr(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """Learning rate of a 0-based epoch.

    "paper": x0.1 from epoch round(epochs/2), x0.01 from round(2*epochs/3) (120 -> 60, 80).
    "authors": their adjust_learning_rate(epoch + 1): x0.1 once epoch + 1 >= round(epochs/2),
      x0.01 from round(3*epochs/4), x0.005 from round(11*epochs/12) (120 epochs -> 0-based
      epochs 59, 89, 109: their loop passes the 1-based epoch, so the first drop comes after
      59 epochs at the full rate).
    "constant": lr.
    Python's round (half to even) on the exact fractions, e.g. 15 epochs "paper" -> 8, 10.
    """
    if schedule == "constant":
        return lr
    if schedule == "paper":
        milestones = [(round(epochs / 2), 0.1), (round(2 * epochs / 3), 0.01)]
    elif schedule == "authors":
        milestones = [(round(epochs / 2), 0.1), (round(3 * epochs / 4), 0.01),
                      (round(11 * epochs / 12), 0.005)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    at = epoch + 1 if schedule == "authors" else epoch
    out = lr
    for start, mult in milestones:   # successive ifs, as adjust_learning_rate
        if at >= start:
            out = lr * mult
    return out


def ref_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, *, method: str, eps: float, alpha: float, steps: int,
                   lam: float = 0.0, beta: float = 6.0, mode: str = "paper", superclass: bool = False,
                   num_classes: int = 10, attack_loss: str | None = None,
                   generator: torch.Generator | None = None, train_attack: str = "pgd",
                   nfgsm_noise: float = 2.0) -> float:
    """One SGD step of `method`, as the authors' train(): attack, model.train(), zero_grad,
    forward(s), loss, backward, step. Returns the loss as a float.

    attack_loss: "ce" (authors' PGD, used by madry, fat-madry and the authors' fat-trades) or
    "kl" (original TRADES); None picks "kl" for trades and "ce" otherwise.
    train_attack: "pgd" (steps of alpha), "fgsm-rs" (ref_fgsm_rs) or "n-fgsm" (ref_nfgsm with k =
    nfgsm_noise), each with that objective; steps is unused by the single-step ones.
    TRADES methods forward x_adv first, then x (trades_var.py), both in train mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if attack_loss is None:
        attack_loss = "kl" if method == "trades" else "ce"
    data = working_copy(x)
    x_adv = None
    if method != "natural":
        if train_attack == "fgsm-rs":
            x_adv = ref_fgsm_rs(model, data, y, eps, alpha, loss=attack_loss, generator=generator)
        elif train_attack == "n-fgsm":
            x_adv = ref_nfgsm(model, data, y, eps, alpha, nfgsm_noise, loss=attack_loss, generator=generator)
        else:
            x_adv = ref_pgd(model, data, y, eps, alpha, steps, loss=attack_loss, generator=generator)
    model.train()
    optimizer.zero_grad()
    if method == "natural":
        final_loss = nn.CrossEntropyLoss(reduction="mean")(model(data), y)
    else:
        output = model(x_adv)
        if method == "madry":
            final_loss = nn.CrossEntropyLoss(reduction="mean")(output, y)
        elif method == "fat-madry":
            final_loss = ref_fat_loss(output, y, num_classes, lam, mode, superclass)
        elif method == "trades":
            final_loss = ref_trades_loss(model(data), output, y, beta)
        else:
            final_loss = ref_fat_trades_loss(model(data), output, y, num_classes, beta, lam, mode,
                                             superclass)
    final_loss.backward()
    optimizer.step()
    return final_loss.item()


def ref_train(cfg, train_set, model: nn.Module, *, attack_loss: str | None = None,
              max_steps: int | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Train `model` in place as cfg (fastfat.config.TrainConfig) says, the authors' way.

    SGD(lr, momentum, weight_decay); TorchvisionLoader (per-sample RandomCrop + flip, the data
    set's defaults unless cfg overrides them) on train_set.subset(cfg.train_limit) (or, with
    cfg.train_per_class, on data.split.balanced_pool's class-balanced pool), less the validation
    hold-out with cfg.val_per_class (no selection: the last epoch's model), each batch
    moved to `device` (None: the model's), as their `data.cuda()`; lr from ref_lr at the start of
    each 0-based epoch; attack noise from epoch_generator(cfg.seed, epoch, device, "attack"),
    drawn batch after batch. max_steps stops after that many SGD steps in total (for pinning a
    few steps against the fast trainer).
    Raises FloatingPointError if the loss becomes NaN or inf. Returns the model.
    """
    from ..data import TorchvisionLoader, dataset_info

    device = torch.device(device) if device is not None else next(model.parameters()).device
    info = dataset_info(cfg.dataset)
    pad = info.crop_pad if cfg.crop_pad is None else cfg.crop_pad
    flip = info.flip if cfg.flip is None else cfg.flip
    # the fast trainer's training data, drawn by the same functions (train.train's choice)
    from ..data.split import split_training_set, training_pool
    data = (split_training_set(cfg, train_set)[0] if cfg.val_per_class is not None
            else training_pool(cfg, train_set))
    loader = TorchvisionLoader(data, cfg.batch_size, True, seed=cfg.seed,
                               crop_pad=pad, flip=flip, num_workers=cfg.num_workers,
                               drop_last=cfg.drop_last, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    alpha = cfg.alpha()
    done = 0
    for epoch in range(cfg.epochs):
        lr = ref_lr(epoch, cfg.epochs, cfg.lr, cfg.schedule)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        loader.set_epoch(epoch)
        generator = epoch_generator(cfg.seed, epoch, device, "attack")
        for data, target in loader:
            if max_steps is not None and done >= max_steps:
                return model
            loss = ref_train_step(model, optimizer, data, target, method=cfg.method,
                                  eps=cfg.eps_train, alpha=alpha, steps=cfg.steps, lam=cfg.lam,
                                  beta=cfg.beta, mode=cfg.vcar_mode, superclass=cfg.superclass,
                                  num_classes=info.num_classes, attack_loss=attack_loss,
                                  generator=generator, train_attack=cfg.train_attack,
                                  nfgsm_noise=cfg.nfgsm_noise)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} in epoch {epoch + 1}")
            done += 1
    return model
