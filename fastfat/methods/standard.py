"""The base methods as registry entries like the peer methods: natural training, Madry's PGD-AT,
TRADES, and FAT (Ma et al. 2022) on Madry and on TRADES; their losses are fastfat.losses'."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels, losses
from .base import Method, MethodState


class _Stateless(MethodState):
    """A base method's training keeps nothing between epochs: its checkpoints hold no "method"."""

    def state_dict(self) -> None:
        return None


class NaturalState(_Stateless):
    """Natural training: CE on the clean logits, no attack."""
    adversarial = False
    natural_forward = True

    def loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(kernels.upcast(logits_nat), y), self.zero()


class MadryState(_Stateless):
    """Madry et al.'s PGD-AT: CE on the adversarial logits, attacked with CE (MethodState's
    defaults with no base: its base_loss is Madry's)."""


class TradesState(_Stateless):
    """TRADES (Zhang et al. 2019): its KL attack objective and its CE + beta * KL loss."""
    attack_loss = "kl"
    natural_forward = True

    def loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        return losses.trades_loss(logits_nat, logits_adv, y, self.cfg.beta), self.zero()


class FATState(_Stateless):
    """FAT on Madry or on TRADES (base): the base's loss + lam * VCAR of the per-sample
    adversarial CE. The authors' FAT-TRADES attacks with CE (trades_var.py), not TRADES' KL."""

    attack_loss = "ce"

    def loss(self, y, logits_adv, logits_nat) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if self.base == "trades":
            return losses.fat_trades_loss(logits_nat, logits_adv, y, self.num_classes, cfg.beta, self.lam,
                                          cfg.vcar_mode, cfg.superclass, return_vcar=True)
        return losses.fat_loss(logits_adv, y, self.num_classes, self.lam, cfg.vcar_mode, cfg.superclass,
                               return_vcar=True)


# Fusion families: the same attack objective and train-mode forwards. TRADES attacks with its KL
# objective and the authors' FAT-TRADES with CE, so those two do not fuse.
NATURAL = Method(bases={"natural": None}, titles={"natural": "Natural"}, state=NaturalState, attacks=False,
                 single_step=False, family={"natural": "natural"}, source="standard training")
MADRY = Method(bases={"madry": None}, titles={"madry": "Madry"}, state=MadryState, family={"madry": "madry"},
               source="Madry et al., ICLR 2018")
TRADES = Method(bases={"trades": None}, titles={"trades": "TRADES"}, state=TradesState,
                family={"trades": "trades"}, source="Zhang et al., ICML 2019")
FAT = Method(bases={"fat-madry": "madry", "fat-trades": "trades"},
             titles={"fat-madry": "FAT-Madry", "fat-trades": "FAT-TRADES"}, state=FATState, lam=True,
             family={"fat-madry": "madry", "fat-trades": "fat-trades"},
             source="Ma, Wang, Liu, NeurIPS 2022 (wzekai99/FAT)")
