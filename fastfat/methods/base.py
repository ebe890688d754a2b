"""MethodState, the per-run state of a peer robust-fairness method that the Trainer consults,
and the small pieces the methods share (class tables, per-class accumulators, epoch counts)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .. import kernels

# The key of a method's state_dict whose value (a model state dict) is what the run's evaluation
# loads (fastfat.train.load_model) instead of the trained weights: CFA's FAWA average.
EVAL_MODEL = "eval_model"


class MethodState:
    """What a method changes in its base method's training, consulted by fastfat.train.Trainer.

    The defaults reproduce the base method (cfg's BASE_METHODS entry, "madry" or "trades")
    exactly, through the same code path; a method overrides only what it changes:
      begin(model, validation, start_epoch)  once, before the first epoch this process trains
      start_epoch(epoch)        before the epoch's first step (0-based epoch): reset accumulators,
                                fix this epoch's class tables
      radii(y)                  the training attack's (eps, alpha) for labels y [N]: floats, or
                                per-sample tensors [N] (pixel units)
      loss(y, adv, nat)         (loss, vcar) from the train-mode logits [N, C] (nat only for a
                                TRADES base, else None); accumulate per-class statistics here
                                (detached, through fastfat.kernels) without a host sync
      end_epoch(epoch, model, row)  after the epoch and its validation scoring (row holds
                                val_* when cfg.val_per_class is set); update the state, return the
                                fields to add to the epoch's log row
      state_dict / load_state_dict  everything end_epoch leaves behind (tensors, numbers, None),
                                saved in the checkpoint after every epoch, so a resumed run repeats
                                an uninterrupted one; a state_dict()[EVAL_MODEL] (a model state
                                dict) is what the run's evaluation loads instead of its weights.
    Accumulators live within one epoch only: checkpoints fall between epochs.
    """

    def __init__(self, cfg, num_classes: int, device):
        from ..config import base_method
        self.cfg, self.num_classes, self.device = cfg, num_classes, torch.device(device)
        self.base = base_method(cfg.method)
        self.base_cfg = dataclasses.replace(cfg, method=self.base)
        # TRADES' KL objective, as the base method attacks (and these methods' code does)
        self.attack_loss = "kl" if self.base == "trades" else "ce"
        self.alpha = cfg.alpha()

    @property
    def natural_forward(self) -> bool:
        """Whether the loss needs the natural logits (a TRADES base)."""
        return self.base == "trades"

    def begin(self, model: nn.Module, validation, start_epoch: int) -> None:
        """Before the run's first epoch (0-based start_epoch; > 0 on resume, after
        load_state_dict): the model as it starts and the validation split's scorer
        (fastfat.selection.Selector; None without cfg.val_per_class). WAT and FRL keep the
        scorer; FRL makes its first update here."""

    def start_epoch(self, epoch: int) -> None:
        pass

    def radii(self, y: torch.Tensor):
        return self.cfg.eps_train, self.alpha

    def loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base_loss(y, logits_adv, logits_nat)

    def base_loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        """The base method's (loss, vcar), exactly as its own runs compute it."""
        from ..train import method_loss   # train imports this package
        return method_loss(self.base_cfg, self.num_classes, y, logits_adv, logits_nat)

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)


# ---------------------------------------------------------------------------------------------

def epochs_of(value: float, epochs: int) -> int:
    """An epoch count given as N >= 1 epochs or a fraction 0 < f < 1 of the run's epochs
    (rounded, at least 1), as config fields such as cfa_begin and dafa_warmup take it."""
    return int(value) if value >= 1 else max(1, round(value * epochs))


def gather(table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A class table [C] read per sample: [N] with entry i = table[y_i]."""
    return table.index_select(0, y)


class ClassSums:
    """Per-class sums of a per-sample quantity [N] or vector [N, D] over an epoch, and the
    class counts, kept on the device (no host sync); through kernels.class_stats."""

    # a [N, D] quantity is reduced in one class_stats call over C * D bins when that stays small
    # (the Triton kernel takes a bounded number of bins), else in column blocks of that size
    BINS = 4096

    def __init__(self, num_classes: int, dim: int | None, device):
        self.num_classes, self.dim = num_classes, dim
        shape = (num_classes,) if dim is None else (num_classes, dim)
        self.sums = torch.zeros(shape, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, y: torch.Tensor) -> None:
        """values [N] or [N, D] (detached, fp32/bf16/fp16), y [N] int64."""
        c = self.num_classes
        if self.dim is None:
            s, n = kernels.class_stats(values, y, c)
            self.sums += s.double()
        else:
            width = max(1, self.BINS // c)
            for j in range(0, self.dim, width):
                block = values[:, j:j + width]
                d = block.shape[1]
                # bin (class, column) = y * d + column: one reduction for the whole block
                bins = (y[:, None] * d + torch.arange(d, device=y.device)).flatten()
                s, _ = kernels.class_stats(block.flatten(), bins, c * d)
                self.sums[:, j:j + d] += s.double().view(c, d)
            _, n = kernels.class_stats(torch.ones(y.shape, device=y.device), y, c)
        self.counts += n.double()

    def means(self) -> torch.Tensor:
        """sums / counts per class (float64); 0 for a class without samples."""
        n = self.counts.clamp(min=1)
        return self.sums / (n if self.dim is None else n[:, None])
