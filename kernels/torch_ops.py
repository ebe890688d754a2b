"""Plain-torch twins of fastfat's kernels.

These are the CPU path and the ground truth the Triton kernels are tested against. Every function
here is differentiable where its Triton twin is, and does no host sync (no .item(), no Python
branching on tensor values), so the same code runs unchanged inside torch.compile and on CUDA.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# CIFAR-100 fine label -> coarse (super)class, the dataset's own 'coarse_labels' mapping.
CIFAR100_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)

# wzekai99/FAT's cifar100_super_map.json: the same table except fine label 39 (keyboard), which
# it puts in superclass 9 (CIFAR-100 says 5; so its superclass 9 has 6 members and 5 has 4).
# Their --superclass numbers were computed with it, so "authors" VCAR mode uses it.
CIFAR100_COARSE_AUTHORS = CIFAR100_COARSE[:39] + (9,) + CIFAR100_COARSE[40:]


def superclass_map(mode: str) -> tuple[int, ...]:
    """The fine -> coarse table a VCAR mode folds CIFAR-100 with: the authors' map in "authors"
    mode, the dataset's own in "paper" mode."""
    return CIFAR100_COARSE_AUTHORS if mode == "authors" else CIFAR100_COARSE


@functools.lru_cache(maxsize=None)
def _coarse_index(mode: str, device: torch.device) -> torch.Tensor:
    """superclass_map(mode) as an int64 tensor on device, built once: torch.tensor(list,
    device=cuda) is a host-to-device copy, which would sync at every VCAR evaluation."""
    return torch.tensor(superclass_map(mode), device=device)


# The authors' code keeps a vector of 100 class means whatever the data set (pgd_var.py).
AUTHORS_SLOTS = 100

VCAR_MODES = ("paper", "authors")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the math; fp32 and fp64 stay as they are (fp64 pins tests)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample(t: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; a per-sample tensor [N] becomes [N, 1, ..., 1] to broadcast on ref,
    in fp32 (float64 when ref is float64, so float64 pinning runs keep eps exact)."""
    if isinstance(t, torch.Tensor):
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        return t.to(device=ref.device, dtype=dtype).view(-1, *([1] * (ref.dim() - 1)))
    return float(t)


def pgd_step(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor,
             alpha: torch.Tensor | float, eps: torch.Tensor | float) -> torch.Tensor:
    """In place: x_adv <- clamp(clamp(x_adv + alpha*sign(grad), x_nat-eps, x_nat+eps), 0, 1).

    Math in fp32 whatever the storage dtype; returns x_adv.
    """
    a, e = per_sample(alpha, x_adv), per_sample(eps, x_adv)
    xa, xn = upcast(x_adv), upcast(x_nat)
    # each on its own: one may be a float and the other a per-sample tensor
    a, e = (v.to(xa.dtype) if isinstance(v, torch.Tensor) else v for v in (a, e))
    step = torch.sign(upcast(grad))
    if xa is x_adv and step.dtype == x_adv.dtype and step.shape == x_adv.shape:
        # fp32/fp64 storage: update in place and reuse one scratch tensor for both bounds. Fresh
        # image-sized tensors cost page faults on the CPU, so this is several times faster than
        # building the result and copying it back; the numbers are the same (alpha * sign(grad)
        # is exact either way).
        if isinstance(a, torch.Tensor):
            x_adv.addcmul_(a, step)
        else:
            x_adv.add_(step, alpha=a)
        torch.maximum(x_adv, torch.sub(xn, e, out=step), out=x_adv)
        torch.minimum(x_adv, torch.add(xn, e, out=step), out=x_adv)
        return x_adv.clamp_(0.0, 1.0)
    out = xa + a * step
    out = torch.minimum(torch.maximum(out, xn - e), xn + e).clamp_(0.0, 1.0)
    x_adv.copy_(out)
    return x_adv


def class_stats(values: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Per-class sums and counts of a per-sample quantity.

    values [N] (any float dtype), y [N] int64 -> (sums [C] fp32 (fp64 for fp64 values),
    differentiable in values; counts [C] same dtype). Deterministic and without a host sync on
    every device: on the CPU a sequential index_add and bincount; elsewhere (CUDA) a masked sum
    over the [N, C] one-hot, a fixed-order tree reduction (index_add would use float atomics,
    bincount syncs to size its output).
    """
    v = upcast(values)
    if values.device.type != "cpu":
        return _class_stats_onehot(v, y, num_classes)
    sums = torch.zeros(num_classes, dtype=v.dtype, device=values.device).index_add(0, y, v)
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].to(v.dtype)
    return sums, counts


def _class_stats_onehot(v: torch.Tensor, y: torch.Tensor, num_classes: int):
    """class_stats off the CPU: sums and counts reduced over a [N, C] one-hot mask."""
    hit = y[:, None] == torch.arange(num_classes, device=y.device)
    sums = torch.where(hit, v[:, None], torch.zeros((), dtype=v.dtype, device=v.device)).sum(0)
    return sums, hit.sum(0).to(v.dtype)


def class_ce_stats(logits: torch.Tensor, y: torch.Tensor, num_classes: int):
    """logits [N, C], y [N] -> (per-sample CE [N] fp32, class sums [C] fp32, class counts [C] fp32)."""
    ce = F.cross_entropy(upcast(logits), y, reduction="none")
    sums, counts = class_stats(ce, y, num_classes)
    return ce, sums, counts


def vcar_from_stats(sums: torch.Tensor, counts: torch.Tensor, mode: str = "paper",
                    superclass: bool = False) -> torch.Tensor:
    """Variance of class-wise adversarial risk from per-class sums and counts [C].

    mode "paper": population variance over the classes present in the batch of their mean loss.
    mode "authors": the class means (0 for absent classes) padded with zeros to 100 entries,
      unbiased variance (divides by 99), as wzekai99/FAT pgd_var.py.
    superclass (C = 100 only): class means summed into CIFAR-100's 20 superclasses and divided
      by 5; then the variance over 20 (unbiased in "authors" mode; population over the superclasses
      with a present class in "paper" mode). The fine -> coarse table is superclass_map(mode).
    Differentiable in sums. Returns a 0-dim fp32 tensor.
    """
    if mode not in VCAR_MODES:
        raise ValueError(f"unknown VCAR mode {mode!r}; expected one of {VCAR_MODES}")
    means = sums / counts.clamp(min=1.0)
    present = (counts > 0).to(means.dtype)
    if superclass:
        if sums.numel() != 100:
            raise ValueError("superclass VCAR needs the 100 classes of CIFAR-100")
        coarse = _coarse_index(mode, sums.device)
        means = torch.zeros(20, dtype=means.dtype, device=means.device).index_add(0, coarse, means) / 5.0
        present = (torch.zeros(20, dtype=means.dtype, device=means.device).index_add(0, coarse, present) > 0).to(means.dtype)
        slots = 20
    else:
        slots = max(AUTHORS_SLOTS, sums.numel())
    if mode == "paper":
        n = present.sum().clamp(min=1.0)
        mu = (means * present).sum() / n
        return (((means - mu) ** 2) * present).sum() / n
    # authors: zeros beyond the real classes count in the mean and in the sum of squares.
    k = means.numel()
    mu = means.sum() / slots
    ss = ((means - mu) ** 2).sum() + (slots - k) * mu ** 2
    return ss / (slots - 1)


def fat_ce_loss(logits: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                mode: str = "paper", superclass: bool = False, ce_weight: float = 1.0):
    """ce_weight * mean CE + lam * VCAR(per-sample CE), and its parts.

    logits [N, C] -> (loss, mean_ce, vcar), all 0-dim fp32; loss is differentiable in logits.
    ce_weight = 0 gives the VCAR term alone (FAT on TRADES adds it to the TRADES loss).
    """
    ce, sums, counts = class_ce_stats(logits, y, num_classes)
    mean_ce = ce.mean()
    v = vcar_from_stats(sums, counts, mode, superclass)
    return ce_weight * mean_ce + lam * v, mean_ce.detach(), v.detach()


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-sample C&W margin objective to maximise: -clamp(z_y - max_{j != y} z_j + kappa, min=0).

    logits [N, C] -> [N] fp32 (as wzekai99/FAT attack_generator.py cwloss, per sample).
    """
    z = upcast(logits)
    onehot = F.one_hot(y, z.shape[1]).to(torch.bool)
    correct = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(onehot, float("-inf")).amax(1)
    return -torch.clamp(correct - other + kappa, min=0.0)


def trades_kl(logits_adv: torch.Tensor, logits_nat: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(nat) || softmax(adv)), summed over classes: [N, C] x2 -> [N] fp32.

    The same quantity as nn.KLDivLoss(reduction="none")(log_softmax(adv), softmax(nat)).sum(1),
    TRADES' robust regulariser; differentiable in both inputs.
    """
    logp_adv = F.log_softmax(upcast(logits_adv), dim=1)
    # softmax (not exp(log_softmax)) for the target, as KLDivLoss is fed in TRADES: near the
    # start x_adv ~ x the gradient softmax(adv) - p_nat is a cancellation, and its sign, which is
    # all PGD uses, depends on these last bits.
    p_nat = F.softmax(upcast(logits_nat), dim=1)
    return (torch.xlogy(p_nat, p_nat) - p_nat * logp_adv).sum(1)
