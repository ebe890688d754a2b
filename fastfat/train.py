"""Training: every method of the fastfat.methods registry (natural, Madry PGD-AT, TRADES, FAT on
either, and the peer methods on Madry or TRADES), through its MethodState.

One step = attack (PGD on a BN-folded eval copy, input gradients only) -> forward on x_adv
(AMP on CUDA) -> the method's loss (fastfat.losses) -> SGD. Each epoch ends with an atomic checkpoint
and a log row; `resume` continues from the last checkpoint and reproduces an uninterrupted run
exactly, because every random stream is keyed by (seed, epoch).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks, kernels, methods, selection
from .config import TrainConfig
from .data import build_loader, dataset_info
from .data.split import loader_config, split_training_set, training_pool
from .errors import UserError
from .files import check_writable_dir
from .guard import build_guard, stopped
from .models.fold import fold_bn
from .runfiles import (CHECKPOINT, RUN_FILES, build_for_config, load_init_weights, load_resume_state, load_teacher,
                       save_run)
from .runtime import amp_dtype, autocast, guard_cpu_convs, progress_bar, resolve_device, set_backends, synchronize
from .seeding import epoch_generator


# ---------------------------------------------------------------------------------------------
# Small pieces

SCHEDULE_MILESTONES = {
    # (fraction of the epochs at which it starts, lr multiplier): 120 epochs -> 60/80 and 60/90/110
    "paper": ((1 / 2, 0.1), (2 / 3, 0.01)),
    "authors": ((1 / 2, 0.1), (3 / 4, 0.01), (11 / 12, 0.005)),
    "constant": (),
}


def lr_at(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """Piecewise-constant learning rate for a 0-based epoch. "authors" counts its milestones in
    1-based epochs, as their loop calls adjust_learning_rate(optimizer, epoch + 1): with 120
    epochs the rate drops at 0-based epochs 59, 89 and 109."""
    at = epoch + 1 if schedule == "authors" else epoch
    mult = 1.0
    for frac, m in SCHEDULE_MILESTONES[schedule]:
        if at >= round(frac * epochs):
            mult = m
    return lr * mult


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The SGD a config trains with (lr, momentum, weight decay, Nesterov or not); fused groups
    build theirs here too."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


class NonFiniteLoss(UserError):
    """Training diverged: the loss became NaN or inf."""


# ---------------------------------------------------------------------------------------------
# The step

def warmup_lam(lam: float, warmup_epochs: int, step: int, steps_per_epoch: int) -> float:
    """FAT's lambda at 1-based global `step` (epoch * steps_per_epoch + step in epoch + 1) under a
    linear warm-up over `warmup_epochs` epochs: lam * min(1, step / (warmup_epochs * steps_per_epoch)),
    rising step by step, so it reaches lam at the last step of epoch warmup_epochs; lam when
    warmup_epochs is 0. A function of (epoch, step) only, so a resumed run repeats it."""
    if warmup_epochs <= 0:
        return lam
    return lam * min(1.0, step / (warmup_epochs * steps_per_epoch))


@dataclass
class StepOut:
    loss: torch.Tensor   # 0-dim, detached
    vcar: torch.Tensor   # 0-dim, detached (0 for methods without VCAR)


class Trainer:
    """Holds the model, optimizer and AMP state, and runs one training step at a time.

    device: where the model is; None (the default) reads it off the model's parameters. On CUDA
    the config's process-wide switches (tf32, cudnn_benchmark, deterministic) are set here."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device | str | None = None):
        if device is None:
            device = next(model.parameters()).device
        self.cfg, self.model, self.device = cfg, model, torch.device(device)
        guard_cpu_convs(model, self.device)   # oneDNN's AVX2 crash (runtime.guard_cpu_convs)
        set_backends(self.device, tf32=cfg.tf32, cudnn_benchmark=cfg.cudnn_benchmark,
                     deterministic=cfg.deterministic)
        self.num_classes = dataset_info(cfg.dataset).num_classes
        # the method's training (fastfat.methods): its attack, forwards, loss and per-run state
        self.method_state = methods.build(cfg, self.num_classes, self.device)
        self.optimizer = make_optimizer(cfg, model.parameters())
        self.amp = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.attack_loss = self.method_state.attack_loss   # CE, or TRADES' KL objective
        self.forward = torch.compile(model) if cfg.compile else model
        self._folded = None
        self._attack_forward = None   # the folded copy, compiled when cfg.compile

    def set_epoch_lr(self, epoch: int) -> float:
        lr = lr_at(epoch, self.cfg.epochs, self.cfg.lr, self.cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def attack_model(self) -> nn.Module:
        """What the attack differentiates: a BN-folded eval copy (cheaper, same math) or the model;
        compiled when cfg.compile."""
        if self.cfg.fold_bn:
            # Refreshed in place after each step's weights change, so the compiled copy keeps its
            # graph (its weights are graph inputs, read afresh at every call).
            # Stored in the AMP dtype (autocast would re-cast fp32 weights at every forward).
            self._folded = fold_bn(self.model, out=self._folded, dtype=self.amp)
            if self._attack_forward is None:
                self._attack_forward = torch.compile(self._folded) if self.cfg.compile else self._folded
            return self._attack_forward
        # Not self.forward: a compiled graph of the trainable model would compute parameter
        # gradients in its backward whatever autograd.grad asks for.
        return self.model

    def adversarial(self, x, y, generator=None) -> torch.Tensor:
        """The training attack's x_adv for x [N, C, H, W], y [N]: the method's own attack where it
        has one, else PGD at its radii. cfg.attack_bn "train" attacks the model itself in train
        mode (batch statistics; every forward updates BN's running statistics), as CFA's code."""
        cfg = self.cfg
        batch_stats = cfg.attack_bn == "train"
        model = self.model if batch_stats else self.attack_model()
        state = self.method_state
        x_adv = state.attack(model, x, y, generator, self.amp)
        if x_adv is not None:
            return x_adv
        eps, alpha = state.radii(y)
        return attacks.pgd(model, x, y, eps, alpha, loss=self.attack_loss, generator=generator,
                           amp=self.amp, fold_bn=cfg.fold_bn, batch_stats=batch_stats,
                           **state.attack_args(eps))

    def loss(self, x, y, x_adv) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, vcar) for the method; model in train mode. x, x_adv [N, C, H, W], y [N]."""
        state = self.method_state
        with autocast(self.device, self.amp):
            if not state.adversarial:
                return state.loss(y, None, self.forward(x))
            # the natural forward after the adversarial one, as the authors (or before it, where
            # a method's code does so: the order moves BatchNorm's running statistics)
            natural = state.natural_forward
            first = natural and state.natural_first
            logits_nat = self.forward(x) if first else None
            logits_adv = self.forward(x_adv)
            if natural and not first:
                logits_nat = self.forward(x)
        return state.loss(y, logits_adv, logits_nat)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator=None) -> StepOut:
        """One SGD step on a batch x [N, C, H, W] in [0, 1], y [N]; attack noise from generator."""
        x_adv = self.adversarial(x, y, generator) if self.method_state.adversarial else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, v = self.loss(x, y, x_adv)
        clip = self.cfg.clip_grad_norm
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.optimizer)   # clip the true gradient, not the scaled one
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip is not None:   # the global L2 norm over all parameters; no host sync
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        return StepOut(loss.detach(), v)


# ---------------------------------------------------------------------------------------------
# The loop

def train_epoch(trainer: Trainer, loader, epoch: int, *, progress: bool = False,
                position: int = 0) -> dict:
    """One training epoch (0-based `epoch`): its learning rate, the loader's order and
    augmentation for the epoch, and the attack noise from epoch_generator(seed, epoch, "attack"), so any
    epoch replays exactly. Returns the log row {"epoch" (1-based), "lr", "loss" (mean over
    samples), "vcar" (mean over steps), "seconds", "images_per_s"}, and "lam" (lambda at the
    epoch's last step) during a warm-up of lambda (cfg.lam_warmup_epochs).

    The running sums stay on the device: the host reads them only for the progress bar (every
    5 steps) and at the end. Raises NonFiniteLoss if the loss is NaN or inf, or if the model
    after the epoch's last update is (check_model), so no checkpoint holds ruined weights.
    """
    cfg, device = trainer.cfg, trainer.device
    lr = trainer.set_epoch_lr(epoch)
    loader.set_epoch(epoch)
    trainer.method_state.start_epoch(epoch)
    gen = epoch_generator(cfg.seed, epoch, device, "attack")
    bar = progress_bar(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", progress, position=position)
    tot_loss = torch.zeros((), device=device)
    tot_vcar = torch.zeros((), device=device)
    synchronize(device)   # CUDA queues work: the clock starts and stops with the device idle
    seen, steps, t0 = 0, 0, time.perf_counter()
    warm = cfg.lam_warmup_epochs > 0 and cfg.has_lambda
    x = y = None
    try:
        for x, y in loader:
            if warm:
                trainer.method_state.lam = warmup_lam(cfg.lam, cfg.lam_warmup_epochs, epoch * len(loader) + steps + 1,
                                         len(loader))
            out = trainer.train_step(x, y, gen)
            tot_loss += out.loss * y.numel()
            tot_vcar += out.vcar
            seen, steps = seen + y.numel(), steps + 1
            if bar is not None and (steps % 5 == 0 or steps == len(loader)):
                mean_loss = float(tot_loss) / seen
                check_finite(mean_loss, epoch, steps)
                bar.set_postfix(loss=f"{mean_loss:.4f}", vcar=f"{float(tot_vcar) / steps:.4f}",
                                lr=f"{lr:g}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                bar.update(steps - bar.n)
    finally:
        if bar is not None:
            bar.close()  # also on a diverged loss, so the error line is not buried in a bar
    synchronize(device)
    secs = time.perf_counter() - t0
    row = {"epoch": epoch + 1, "lr": lr, "loss": float(tot_loss) / max(seen, 1),
           "vcar": float(tot_vcar) / max(steps, 1), "seconds": secs,
           "images_per_s": seen / secs if secs > 0 else 0.0}
    if warm:
        row["lam"] = trainer.method_state.lam
    check_finite(row["loss"], epoch, steps)
    if x is not None:
        check_model(trainer.model, x, y, epoch)
    return row


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
    """NonFiniteLoss unless every weight and buffer of model is finite and its eval-mode loss on
    the batch x [N, C, H, W], y [N] is: run after an epoch's last update, whose blow-up the
    epoch's loss (computed before each update) cannot show. Weights can be huge yet finite (lr
    1e30 gives about 1e28); the eval-mode forward, which BatchNorm's batch statistics do not
    rescale, overflows then. The model's mode is kept; nothing else changes."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    weights_ok = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    loss = math.nan
    if weights_ok:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                loss = float(F.cross_entropy(kernels.upcast(model(x)), y))
        finally:
            model.train(was_training)
    if not weights_ok or not math.isfinite(loss):
        what = "non-finite weights" if not weights_ok else f"a loss of {loss} on its last batch"
        raise NonFiniteLoss(f"training diverged: after epoch {epoch + 1}'s last step the model has "
                            f"{what}; {DIVERGENCE_LEVERS}")


def build_train_loader(cfg: TrainConfig, device: torch.device, data=None):
    """The training loader of a config (its seed orders and augments the batches); `data` may
    pass an already loaded training ImageSet (memory and torchvision loaders)."""
    return build_loader(cfg.loader, cfg.dataset, "train", data_root=cfg.data_root,
                        download=cfg.download, batch_size=cfg.batch_size, seed=cfg.seed,
                        device=device, crop_pad=cfg.crop_pad, flip=cfg.flip,
                        channels_last=cfg.channels_last, drop_last=cfg.drop_last,
                        limit=cfg.train_limit, num_workers=cfg.num_workers, data=data)


def train(cfg: TrainConfig, out_dir: str | None = None, *, resume: bool = False,
          progress: bool = True, on_epoch=None, position: int = 0) -> tuple[nn.Module, list[dict]]:
    """Train a model as cfg says. Returns (model, per-epoch log rows).

    out_dir: where config.json, checkpoint.pt (after every epoch, atomic) and log.jsonl go.
    resume: continue from out_dir/checkpoint.pt (same config required); a finished run returns
    at once. on_epoch(row) is called after each epoch's checkpoint is on disk.
    With cfg.val_per_class, a stratified hold-out of the training set is scored after every epoch
    (fastfat.selection: val_* in the log rows) and the best epoch's weights go to best.pt.
    With cfg.guard not "off", the catastrophic-overfitting guard scores its batch after every
    epoch (fastfat.guard: co_* in the log rows); under "stop" a flagged epoch ends the run, its
    checkpoint holding the best epoch's weights (a resumed stopped run returns at once).
    A peer method (fastfat.methods) is started before and updated after every epoch (after the
    validation scores), and its state saved in every checkpoint and restored on resume.
    Raises NonFiniteLoss (a UserError) if the loss becomes NaN/inf; nothing is saved for that epoch.
    """
    if out_dir is not None:
        check_writable_dir(out_dir, "out_dir", RUN_FILES)   # before any work, as the CLI does for --out
    device = resolve_device(cfg.device)
    state = load_resume_state(cfg, out_dir) if resume else None
    init = load_init_weights(cfg) if state is None else None   # a resumed run has its own weights
    selector = val_set = pool = None
    if cfg.val_per_class is not None:   # train on the rest of the training set, select on the hold-out
        train_set, val_set = split_training_set(cfg)
        loader = build_train_loader(loader_config(cfg), device, data=train_set)
        selector = selection.Selector(cfg, val_set, device)
    elif cfg.train_per_class is not None:   # a class-balanced pool in memory
        loader = build_train_loader(loader_config(cfg), device, data=training_pool(cfg))
    else:
        loader = build_train_loader(cfg, device)
    guard = build_guard(cfg, device, out_dir, val_set, pool)
    model = build_for_config(cfg, device)
    trainer = Trainer(cfg, model, device)
    start, log = 0, []
    if init is not None:
        try:
            model.load_state_dict(init)
        except Exception as e:   # same model name and width, yet the tensors do not fit
            raise UserError(f"init_from: {cfg.init_from}'s weights do not fit this run's {cfg.model} "
                            f"({type(e).__name__})") from None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            trainer.optimizer.load_state_dict(state["optimizer"])
            if trainer.scaler is not None and "scaler" in state:
                trainer.scaler.load_state_dict(state["scaler"])
            trainer.method_state.load_state_dict(state.get("method", {}))
            start, log = int(state["epoch"]) + 1, [json.loads(r) for r in state["log"]]
            if stopped(log):   # the guard ended it: finished
                start = cfg.epochs
        except Exception as e:   # a digest-valid file whose parts do not fit this config
            raise UserError(f"--resume: {os.path.join(out_dir, CHECKPOINT)} does not fit its config "
                            f"({type(e).__name__}); move it away to start afresh") from None

    trainer.method_state.begin(model, selector, start, load_teacher(cfg, device))
    for epoch in range(start, cfg.epochs):
        row = train_epoch(trainer, loader, epoch, progress=progress, position=position)
        if selector is not None:
            row.update(selector.score(model))
        if guard is not None:
            row.update(guard.score(model))
        # after the scores: CFA's FAWA reads them
        row.update(trainer.method_state.end_epoch(epoch, model, row))
        log.append(row)
        stop = guard is not None and guard.check(log, epoch, model)   # stop: the best weights now
        if out_dir:
            if selector is not None and selector.is_best(log):
                # before checkpoint.pt: a run stopped in between redoes this epoch and rewrites it
                selector.save_best(out_dir, epoch, log, model.state_dict())
            save_run(out_dir, cfg, epoch, log, model.state_dict(), trainer.optimizer.state_dict(),
                     trainer.scaler.state_dict() if trainer.scaler is not None else None,
                     trainer.method_state.state_dict())
        if on_epoch is not None:
            on_epoch(row)
        if stop:
            break
    return model, log


# What a diverging run can change. Measured on digits (README): --clip-grad-norm 1 kept FAT at
# lambda 0.5-2 stable on ResNet18 width 32 and the demo CNN; a warm-up alone helped the CNN only.
DIVERGENCE_LEVERS = ("lower --lr or --lam, or stabilise FAT with --clip-grad-norm 1 "
                     "or --lam-warmup-epochs 2 (see the README)")


def check_finite(loss: float, epoch: int, step: int) -> None:
    """NonFiniteLoss naming the epoch, the step and DIVERGENCE_LEVERS unless loss is finite."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training diverged: the loss is {loss} in epoch {epoch + 1} "
                            f"(by step {step}); {DIVERGENCE_LEVERS}")
