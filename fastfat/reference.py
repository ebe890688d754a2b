"""Plain-PyTorch reference implementation, in the shape of the FAT authors' code.

This module is the ground truth the fast path (fastfat.attacks / losses / metrics / train /
evaluate) is pinned against. It is written independently of the fast path on purpose: it does
not import fastfat.attacks, fastfat.losses, fastfat.metrics or the kernels' logic, and it keeps
the authors' code shape (wzekai99/FAT attack_generator.py, pgd_var.py, trades_var.py,
var_acc_test.py, and the original TRADES), including what makes it slow:

- the attack calls `loss.backward()`, so every step also computes all parameter gradients;
- the model is put in eval mode for the attack and back in train mode for the update;
- per-class reductions are Python loops over the classes (one host sync per class);
- fp32 (float64 when given float64 inputs, for pinning runs), contiguous NCHW, no torch.compile,
  no AMP, no BN folding, no kernel dispatch.

Conventions shared with the fast path (so the two can be compared bit for bit):
- uniform random start: `torch.empty(x.shape).uniform_(-eps, eps, generator=g)` drawn in
  contiguous NCHW order; the fast path draws U(-1, 1) and multiplies by eps, which is the same
  float32 numbers (tests/test_attacks.py pins that);
- TRADES start: `x + 0.001 * torch.randn(x.shape, generator=g)`, not clamped (as TRADES);
- the random streams (data order, training attack noise, evaluation start noise) follow the
  contract in fastfat.seeding, which both sides import.

Where the paper and the authors' code disagree, both are available (the README's "fidelity modes"):
VCAR mode "paper" (population variance over the classes present) or "authors" (100 slots,
unbiased torch.var; superclass folding by their cifar100_super_map.json, which puts fine class 39
in superclass 9 where CIFAR-100 says 5) and the "authors" schedule is their adjust_learning_rate
called with epoch + 1. Known deviations from the authors' files, on purpose:
- a class whose mean loss is NaN propagates NaN (the authors skip any NaN class mean, which
  would hide a diverged run); absent classes are skipped in both;
- ref_pgd restores the model's mode after the attack (the authors leave it in eval mode and
  rely on the training loop's model.train()).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Data, not logic: CIFAR-100 fine label -> coarse label, the dataset's own table (checked
# against it in tests/test_losses.py) and the authors' cifar100_super_map.json.
from .data.superclasses import CIFAR100_COARSE, CIFAR100_COARSE_AUTHORS
from .seeding import epoch_generator, eval_noise_seed

AUTHORS_SLOTS = 100   # the authors' `torch.zeros(100)` vector of class means
SUPERCLASSES = 20


# ---------------------------------------------------------------------------------------------
# Attacks (attack_generator.py's pgd, plus the original TRADES KL attack)

def _working_copy(x: torch.Tensor) -> torch.Tensor:
    """x detached, contiguous NCHW; fp32 unless x is already floating (float64 runs pin the math
    without fp32 rounding)."""
    x = x.detach()
    return (x if x.is_floating_point() else x.float()).contiguous()


def ref_cwloss(output: torch.Tensor, target: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """The authors' C&W loss, summed over the batch: -clamp(z_y - max_{j!=y} z_j + kappa, min=0).

    One-hot form as in attack_generator.py: the true class is pushed out of the max by -10000.
    """
    num_classes = output.shape[1]
    target_onehot = torch.zeros(target.size() + (num_classes,), dtype=output.dtype, device=output.device)
    target_onehot.scatter_(1, target.unsqueeze(1), 1.0)
    real = (target_onehot * output).sum(1)
    other = ((1.0 - target_onehot) * output - target_onehot * 10000.0).max(1)[0]
    loss = -torch.clamp(real - other + kappa, min=0.0)
    return torch.sum(loss)


def ref_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
            steps: int, loss: str = "ce", random_start: bool = True, kappa: float = 50.0,
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            start_radius: float | None = None, project: bool = True) -> torch.Tensor:
    """l_inf PGD as the authors' attack_generator.pgd (loss "ce" / "cw") or TRADES' attack ("kl").

    x [N, C, H, W] in [0, 1] (any layout; the attack runs on a contiguous NCHW copy, in x's
    floating dtype: fp32 as the authors, float64 for pinning runs),
    y [N] int64, eps / alpha floats in pixel units.
    "ce": nn.CrossEntropyLoss() (batch mean), start clamp(x + U(-eps, eps), 0, 1).
    "cw": ref_cwloss with kappa, same start.
    "kl": nn.KLDivLoss(reduction="sum")(log_softmax(model(x_adv)), softmax(model(x))), start
          x + 0.001 * N(0, 1) (unclamped, as TRADES); random_start is ignored.
    noise: optional start noise of x's shape instead of drawing it from `generator`, with the
    fast path's meaning: U(-1, 1) (times eps) for "ce"/"cw", N(0, 1) (times 0.001) for "kl".
    Each step: model.zero_grad(); loss.backward() (parameter grads too, as the authors);
    x_adv + alpha * sign(grad), projected to the eps-ball, clamped to [0, 1].
    The single-step training attacks (ref_fgsm_rs, ref_nfgsm): start_radius r starts at
    clamp(x + U(-r, r), 0, 1) whatever the loss; project=False leaves out the eps-ball (not the
    [0, 1] clamp).
    Returns x_adv [N, C, H, W], contiguous NCHW, detached. The model's mode is restored.
    """
    if loss not in ("ce", "cw", "kl"):
        raise ValueError(f"unknown attack loss {loss!r}")
    was_training = model.training
    model.eval()
    data = _working_copy(x)
    if loss == "kl":
        with torch.no_grad():
            p_natural = F.softmax(model(data), dim=1)
    if start_radius is not None:
        x_adv = torch.clamp(data + _uniform(data, start_radius, generator, noise), 0.0, 1.0)
    elif loss == "kl":
        if noise is None:
            noise = torch.randn(data.shape, device=data.device, generator=generator)
        x_adv = data + 0.001 * noise.to(data.dtype).contiguous()
    elif random_start:
        x_adv = torch.clamp(data + _uniform(data, eps, generator, noise), 0.0, 1.0)
    else:
        x_adv = data.clone()
    # enable_grad: the attack also runs inside callers' no_grad blocks (evaluation).
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_()
            output = model(x_adv)
            model.zero_grad()
            if loss == "ce":
                loss_adv = nn.CrossEntropyLoss(reduction="mean")(output, y)
            elif loss == "cw":
                loss_adv = ref_cwloss(output, y, kappa)
            else:
                loss_adv = nn.KLDivLoss(reduction="sum")(F.log_softmax(output, dim=1), p_natural)
            loss_adv.backward()
            eta = alpha * x_adv.grad.sign()
            x_adv = x_adv.detach() + eta
            if project:
                x_adv = torch.min(torch.max(x_adv, data - eps), data + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train(was_training)
    return x_adv.detach()


def _uniform(data: torch.Tensor, r: float, generator, noise) -> torch.Tensor:
    """The start's U(-r, r) of data's shape: noise * r when given (U(-1, 1)), else drawn."""
    if noise is not None:
        return noise.to(data.dtype).contiguous() * r
    if data.dtype == torch.float32:
        return torch.empty(data.shape, device=data.device).uniform_(-r, r, generator=generator)
    # float64 pinning runs: the same fp32 draw (U(-1, 1), which times r is the fp32
    # uniform_(-r, r) bit for bit), scaled in the working precision as the fast path.
    return torch.empty(data.shape, device=data.device).uniform_(-1.0, 1.0, generator=generator).to(data.dtype) * r


def ref_fgsm_rs(model, x, y, eps: float, alpha: float, loss: str = "ce", generator=None) -> torch.Tensor:
    """FGSM-RS (Wong, Rice, Kolter, 2020): start U(-eps, eps), one signed-gradient step of alpha
    (their 1.25 eps), projected to the eps-ball and clamped to [0, 1]."""
    return ref_pgd(model, x, y, eps, alpha, 1, loss=loss, generator=generator, start_radius=eps)


def ref_nfgsm(model, x, y, eps: float, alpha: float, k: float = 2.0, loss: str = "ce",
              generator=None) -> torch.Tensor:
    """N-FGSM (de Jorge et al., 2022): start U(-k eps, k eps), one signed-gradient step of alpha
    (their eps), no projection to the eps-ball, clamped to [0, 1]."""
    return ref_pgd(model, x, y, eps, alpha, 1, loss=loss, generator=generator, start_radius=k * eps,
                   project=False)


def ref_fgsm(model, x, y, eps: float, random_start: bool = True, generator=None) -> torch.Tensor:
    """FGSM as the authors evaluate it: random start in the ball, then one CE step of size eps."""
    return ref_pgd(model, x, y, eps, eps, 1, loss="ce", random_start=random_start, generator=generator)


def ref_cw(model, x, y, eps: float, alpha: float | None = None, steps: int = 30, kappa: float = 50.0,
           random_start: bool = True, generator=None) -> torch.Tensor:
    """C&W-inf as var_acc_test.py: 30 steps of eps/4 on the margin loss, kappa 50."""
    alpha = eps / 4 if alpha is None else alpha
    return ref_pgd(model, x, y, eps, alpha, steps, loss="cw", random_start=random_start, kappa=kappa,
                   generator=generator)


# ---------------------------------------------------------------------------------------------
# Losses (pgd_var.py / trades_var.py)

def ref_vcar(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int, mode: str = "paper",
             superclass: bool = False) -> torch.Tensor:
    """Variance of class-wise adversarial risk, with a Python loop over the classes.

    mode "authors": a vector of max(100, C) zeros, entry i = mean loss of class i (left 0 when
      absent), torch.var (unbiased). superclass: the 100 entries summed into 20 superclasses by
      the authors' cifar100_super_map.json, divided by 5, torch.var over the 20.
    mode "paper": population variance of the class means over the classes present (superclass:
      CIFAR-100's own superclasses, over those with at least one present class, of the same /5
      sums).
    Differentiable in per_sample_loss; computed in its dtype (so gradcheck can run in double).
    """
    if mode not in ("paper", "authors"):
        raise ValueError(f"unknown VCAR mode {mode!r}")
    if superclass and num_classes != 100:
        raise ValueError("superclass VCAR needs the 100 classes of CIFAR-100")
    dtype, device = per_sample_loss.dtype, per_sample_loss.device
    slots = max(AUTHORS_SLOTS, num_classes)
    loss_list = torch.zeros(slots, dtype=dtype, device=device)
    present = []
    for i in range(num_classes):
        mask = y == i
        if bool(mask.any()):
            loss_list[i] += torch.mean(per_sample_loss[mask])
            present.append(i)

    if superclass:
        coarse = CIFAR100_COARSE_AUTHORS if mode == "authors" else CIFAR100_COARSE
        super_loss = torch.zeros(SUPERCLASSES, dtype=dtype, device=device)
        for i in range(100):
            super_loss[coarse[i]] += loss_list[i]
        super_loss = super_loss / 5
        if mode == "authors":
            return torch.var(super_loss)
        present_super = sorted({coarse[i] for i in present})
        values = super_loss[present_super]
    else:
        if mode == "authors":
            return torch.var(loss_list)
        values = loss_list[present]
    # paper: population variance (divide by the number of classes present)
    return torch.mean((values - torch.mean(values)) ** 2)


def ref_fat_loss(logits_adv: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                 mode: str = "paper", superclass: bool = False) -> torch.Tensor:
    """FAT on Madry (pgd_var.py): mean CE + lam * VCAR of the per-sample CE."""
    loss = nn.CrossEntropyLoss(reduction="none")(logits_adv, y)
    return torch.mean(loss) + float(lam) * ref_vcar(loss, y, num_classes, mode, superclass)


def ref_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """TRADES: CE(nat) + beta * KLDivLoss(sum)(log_softmax(adv), softmax(nat)) / B (nothing detached)."""
    batch_size = len(y)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    loss_natural = nn.CrossEntropyLoss(reduction="mean")(logits_nat, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1),
                                                    F.softmax(logits_nat, dim=1))
    return loss_natural + beta * loss_robust


def ref_fat_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                        num_classes: int, beta: float, lam: float, mode: str = "paper",
                        superclass: bool = False) -> torch.Tensor:
    """FAT on TRADES (trades_var.py): TRADES loss + lam * VCAR of the per-sample CE on adv logits."""
    loss = nn.CrossEntropyLoss(reduction="none")(logits_adv, y)
    loss_var = ref_vcar(loss, y, num_classes, mode, superclass)
    return ref_trades_loss(logits_nat, logits_adv, y, beta) + float(lam) * loss_var


# ---------------------------------------------------------------------------------------------
# Training

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
    data = _working_copy(x)
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
    from .data import TorchvisionLoader, dataset_info

    device = torch.device(device) if device is not None else next(model.parameters()).device
    info = dataset_info(cfg.dataset)
    pad = info.crop_pad if cfg.crop_pad is None else cfg.crop_pad
    flip = info.flip if cfg.flip is None else cfg.flip
    # the fast trainer's training data, drawn by the same functions (train.train's choice)
    from .data.split import split_training_set, training_pool
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


# ---------------------------------------------------------------------------------------------
# Metrics and evaluation (attack_generator.var_eval_*, var_acc_test.py)

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
    from .data import MemoryLoader, TorchvisionLoader

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
