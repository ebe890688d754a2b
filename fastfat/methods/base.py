"""Method, what a method module declares to the registry; MethodState, its per-run state that
the Trainer consults; and the small pieces the methods share (class tables, per-class
accumulators, epoch counts). Imports neither fastfat.config nor fastfat.train."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks, kernels, losses
from ..config_values import check_range
from ..errors import UserError

# The key of a method's state_dict whose value (a model state dict) is what the run's evaluation
# loads (fastfat.runfiles.load_model) instead of the trained weights: CFA's FAWA average.
EVAL_MODEL = "eval_model"


class MethodState:
    """A method's training as fastfat.train.Trainer runs it: every method has one (the base
    methods' are fastfat.methods.standard's).

    The defaults reproduce the base method (the Method's bases entry, "madry" or "trades")
    exactly, through the same code path; a method overrides only what it changes:
      begin(model, validation, start_epoch, teacher)  once, before the first epoch this
                                process trains (teacher: the cfg.teacher model, frozen, or None)
      start_epoch(epoch)        before the epoch's first step (0-based epoch): reset accumulators,
                                fix this epoch's class tables
      attack(model, x, y, generator, amp)  the training attack's x_adv, or None (the default):
                                the base method's attack at radii(y); called before loss() for the
                                same batch, so per-batch data (teacher logits) may wait on self
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
                                None: nothing to keep (the base methods; no "method" entry).
      natural_forward, natural_first  whether the Trainer passes natural logits, and whether
                                it runs that forward before the adversarial one (their code's order)
      adversarial               whether the method trains on an attack at all (natural: False;
                                the Trainer then passes logits_adv None)
      lam                       FAT's lambda for the next step (cfg.lam; a warm-up of lambda
                                sets it step by step); read by the methods that have one
    Accumulators live within one epoch only: checkpoints fall between epochs.
    """

    adversarial = True

    def __init__(self, cfg, num_classes: int, device, base: str | None):
        self.cfg, self.num_classes, self.device = cfg, num_classes, torch.device(device)
        self.base = base   # "madry" or "trades": the Method's bases[cfg.method]; None for a base method
        self.alpha = cfg.alpha()
        self.lam = cfg.lam

    @property
    def attack_loss(self) -> str:
        """The training attack's objective for attacks.pgd: TRADES' KL on a TRADES base, as the
        base method attacks (and these methods' code does), else CE."""
        return "kl" if self.base == "trades" else "ce"

    @property
    def natural_forward(self) -> bool:
        """Whether the loss needs the natural logits (a TRADES base)."""
        return self.base == "trades"

    # Whether the natural forward runs before the adversarial one (their code's order; it moves
    # BatchNorm's running statistics): fastfat's bases run the adversarial one first, as FAT's code.
    natural_first = False

    def begin(self, model: nn.Module, validation, start_epoch: int, teacher: nn.Module | None = None) -> None:
        """Before the run's first epoch (0-based start_epoch; > 0 on resume, after
        load_state_dict): the model as it starts, the validation split's scorer
        (fastfat.selection.Selector; None without cfg.val_per_class) and the teacher (cfg.teacher's
        model in eval mode without parameter gradients; None without one). WAT and FRL keep the
        scorer; FRL makes its first update here."""

    def start_epoch(self, epoch: int) -> None:
        pass

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None,
               amp: torch.dtype | None = None) -> torch.Tensor | None:
        """The training attack's x_adv [N, C, H, W] for x [N, C, H, W] in [0, 1] and y [N], or
        None for the base method's attack at radii(y). model is what the Trainer attacks
        (its BN-folded eval copy, or the model itself under cfg.attack_bn "train"); attack noise
        from generator; amp: the autocast dtype (None: fp32)."""
        return None

    def radii(self, y: torch.Tensor):
        """(eps, alpha) of the training attack for labels y [N]."""
        return self.cfg.eps_train, self.alpha

    def attack_args(self, eps) -> dict:
        """attacks.pgd's steps / start / projection of cfg's training attack (cfg.train_attack) at
        radius eps (float or [N])."""
        return attacks.train_attack_args(self.cfg.train_attack, self.cfg.steps, eps, self.cfg.nfgsm_noise)

    def loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base_loss(y, logits_adv, logits_nat)

    def base_loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        """The base method's (loss, vcar), exactly as its own runs compute it (Madry's CE on the
        adversarial logits, or TRADES' loss; fastfat.methods.standard)."""
        if self.base == "trades":
            return losses.trades_loss(logits_nat, logits_adv, y, self.cfg.beta), self.zero()
        return F.cross_entropy(kernels.upcast(logits_adv), y), self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        return {}

    def state_dict(self) -> dict | None:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)


@dataclasses.dataclass(frozen=True)
class Method:
    """What one method module declares (its module-level METHOD); fastfat.methods.REGISTRY lists
    them, and config, CLI flags, sweep keys, report names and fusion rules read them there.

    bases: each method name the module serves -> the method it modifies ("madry" or "trades"), or
        None for a base method (natural, madry, trades): the report's rho and paired
        comparisons measure a method against its base.
    titles: method name -> the name tables and figures print ("CFA-Madry").
    state: the MethodState subclass the Trainer builds, state(cfg, num_classes, device, base).
    params: a dataclass of the method's hyperparameters, every field named with the method's
        prefix (cfa_lambda1) and made with config_values.opt(default, help): the paper's or their
        code's default and the --help text. TrainConfig inherits these fields, so each is a flag
        (--cfa-lambda1), a sweep key and a checkpoint config entry. None: no hyperparameters.
    check: check(cfg) -> None, raising UserError for a value out of range or a combination that
        cannot run; TrainConfig.validate calls it for every run (whatever its method: a field at
        a bad value is an error even when unused), after the generic checks. None: no checks.
    needs_validation: the method reads the validation split (cfg.val_per_class required).
    fine_tune: starts from a trained model (cfg.init_from required; in a sweep a method's name).
    teacher: distils from a teacher (cfg.teacher required; in a sweep a method's name).
    official_attack_bn: BatchNorm's mode while their code crafts the training attack, "eval" or
        "train", or a dict method name -> mode where the module's methods differ (CFA); recorded
        for docs/methods.md and tests (--attack-bn train gives "train" to any run).
    single_step: whether it trains with a single-step attack (TrainConfig.train_attack fgsm-rs /
        n-fgsm): True where its attack is the base's at radii(y) or its own pgd call made with
        attacks.train_attack_args; False where its attack is a PGD schedule of its own (counts or
        stops along the steps), which config refuses with one line.
    lam: the method has FAT's lambda (cfg.lam; a grid's lam axis applies to it).
    attacks: it trains on a training attack (False for natural training: no eps_train, no
        attack options; a grid plots it at eps_train 0).
    family: method name -> its fusion family: points of one family train as one fused group
        (fastfat.fused), which needs the same attack objective and train-mode forwards (a natural
        forward moves BatchNorm's running statistics). None: the method does not fuse, and
        alone says why.
    alone: why its points train alone (None family), for the fused group's refusal.
    """
    bases: dict
    titles: dict
    state: type
    params: type | None = None
    check: Callable | None = None
    needs_validation: bool = False
    fine_tune: bool = False
    teacher: bool = False
    official_attack_bn: str = "eval"
    single_step: bool = True
    source: str = ""
    lam: bool = False
    attacks: bool = True
    family: dict | None = None
    alone: str = "its per-class state belongs to one run"


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


def check_epoch_count(name: str, value) -> None:
    """UserError unless value is N >= 1 whole epochs or a fraction in (0, 1) (see epochs_of)."""
    check_range(name, value, 0.0, math.inf, low_open=True)
    if value >= 1 and not float(value).is_integer():
        raise UserError(f"{name} must be a whole number of epochs (>= 1) or a fraction of the "
                        f"epochs in (0, 1), got {value:g}")
