"""FAAL (Zhang et al., CVPR 2024): fine-tunes an adversarially trained model with class weights
that maximise the batch's class-wise loss over a KL ball of radius r around the uniform weights,
solved in closed form on the device instead of by a conic solver at every step.

Read from TrustAI/FAAL (FAAL.py::DAW, ft_prn.py, run_prn.py). Per step, from the train-mode
logits on the adversarial batch: the class-wise mean of the softmax margin
m_i = max_{j != y_i} p_ij - p_i,y_i (a class absent from the batch: -1), then weights q on the
simplex that solve
    max_q  sum_c q_c a_c   s.t.  KL(u || q) = sum_c u log(u / q_c) <= r,    u = 1/C,
with a_c = n_c * margin_c (their objective sums q_{y_i} * margin_{y_i} over the batch's samples,
so a class counts once per sample of it), and the loss (C / N) sum_i q_{y_i} CE_i: their run's
AT loss (their script also offers TRADES' and MART's per-sample losses in CE's place; fastfat's
faal is the AT one). Their run: r = 0.5, 2 epochs from a PGD-AT or TRADES checkpoint, lr 0.01
dropped x0.1 after the first epoch, PGD-10 at step 2/255.

The closed forms (Lagrange conditions; the maximiser is interior for r > 0):
  KL(u || q) <= r (their code's cp.kl_div(u, q)):  q_c = 1 / (t + max(a) - a_c), normalised;
  KL(q || u) <= r (the "exponential tilting"):     q_c = exp((a_c - max(a)) / t), normalised;
the temperature t > 0 is the one at which the constraint is tight: KL falls monotonically in t,
so a search on log t finds it (grid refinement, a fixed number of rounds, no host sync). Both
depend on t / spread(a) only, so the search runs on that ratio.
Where fastfat differs, and why:
  - Their training step also runs the model on the clean batch in train mode (its output unused
    by their AT loss, but BatchNorm's running statistics move); fastfat's faal does not.
  - Their script keeps the epoch with the best worst-class robust accuracy on the test set;
    fastfat selects on the validation split (fastfat.selection), never the test set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..config_values import check_choice, check_range, opt
from .base import Method, MethodState

DIVERGENCES = ("code", "tilting")

# log(t / spread) searched over [LOG_LO, LOG_HI]: below e^-700 the weights of the non-maximal
# classes underflow float64 (the vertex the radius allows); above e^40 they are uniform to 1e-17
LOG_LO, LOG_HI = -700.0, 40.0
GRID, ROUNDS = 257, 5     # each round shrinks the bracket 256-fold: 740 / 256^5 ~ 7e-10 in log t


def _weights(d: torch.Tensor, log_s: torch.Tensor, divergence: str) -> torch.Tensor:
    """q [G, C] for gaps d = (max(a) - a) / spread [C] >= 0 at temperatures e^log_s [G]."""
    s = log_s.exp()[:, None]
    if divergence == "code":
        # 1 / (s + d) normalised; scaled by s first so the maximal classes weigh 1 (no overflow)
        w = s / (s + d[None, :])
    else:
        w = torch.exp(-d[None, :] / s)
    return w / w.sum(1, keepdim=True)


def _kl(q: torch.Tensor, divergence: str) -> torch.Tensor:
    """KL(u || q) ("code") or KL(q || u) ("tilting") per row of q [G, C]; inf where q_c = 0."""
    c = q.shape[1]
    if divergence == "code":
        return -math.log(c) - q.log().mean(1)
    return math.log(c) + torch.special.xlogy(q, q).sum(1)


def dro_weights(a: torch.Tensor, r: float, divergence: str = "code") -> torch.Tensor:
    """The maximiser q [C] of sum_c q_c a_c over the simplex within KL radius r (>= 0) of the
    uniform weights, for class losses a [C] (any real values; float64 recommended), in a's
    dtype and device. divergence "code": KL(u || q) as FAAL's code (cvxpy's kl_div(u, q));
    "tilting": KL(q || u). r = 0 or all a equal: the uniform weights. For "tilting", a radius at
    or beyond log(C / #argmax) gives the uniform weights over the maximal classes."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    c = a.numel()
    uniform = torch.full_like(a, 1.0 / c)
    spread = a.max() - a.min()
    d = (a.max() - a) / spread.clamp(min=torch.finfo(a.dtype).tiny)
    lo = torch.full((), LOG_LO, dtype=a.dtype, device=a.device)
    hi = torch.full((), LOG_HI, dtype=a.dtype, device=a.device)
    steps = torch.linspace(0, 1, GRID, dtype=a.dtype, device=a.device)
    for _ in range(ROUNDS):
        grid = lo + (hi - lo) * steps
        over = _kl(_weights(d, grid, divergence), divergence) > r      # True for small t
        # the last grid point still outside the ball (KL falls in t): the bracket is [k, k + 1]
        k = (over.to(torch.int64).sum() - 1).clamp(0, GRID - 2)
        pair = grid.index_select(0, torch.stack([k, k + 1]))   # no host sync
        lo, hi = pair[0], pair[1]
    q = _weights(d, hi[None], divergence)[0]       # hi: inside the ball (feasible side)
    # r = 0, or no spread to tilt along: uniform (spread 0 makes d all 0, so q is uniform anyway)
    return torch.where(torch.as_tensor(r > 0, device=a.device), q, uniform)


def class_margins(probs: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(margin [C], count [C]) of a batch: per class the mean over its samples of
    max_{j != y} p_j - p_y from softmax probs [N, C] (their cw()), -1 for a class absent from
    the batch, and the class's sample count; float64."""
    p = probs.double()
    true = p.gather(1, y[:, None])[:, 0]
    other = p.scatter(1, y[:, None], float("-inf")).max(1).values
    m = other - true
    n = torch.zeros(num_classes, dtype=p.dtype, device=p.device).index_add_(0, y, torch.ones_like(m))
    s = torch.zeros(num_classes, dtype=p.dtype, device=p.device).index_add_(0, y, m)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, -1.0)), n


def faal_weights(probs: torch.Tensor, y: torch.Tensor, num_classes: int, r: float,
                 divergence: str = "code") -> torch.Tensor:
    """FAAL's per-class weights q [C] (float64, sum 1) for one batch: softmax probs [N, C] of the
    adversarial examples, labels y [N]; class losses a_c = n_c * margin_c as their solver sees
    them."""
    m, n = class_margins(probs, y, num_classes)
    return dro_weights(n * m, r, divergence)


def weighted_loss(per_sample: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(C / N) sum_i q_{y_i} loss_i: per-sample losses [N], labels [N], class weights q [C]
    (detached); uniform q gives the plain mean."""
    c, n = q.numel(), per_sample.numel()
    return (per_sample * q.to(per_sample.dtype).index_select(0, y)).sum() * (c / n)


@dataclass
class FAALParams:
    """FAAL's hyperparameters (TrainConfig fields, flags and sweep keys)."""
    faal_r: float = opt(0.5, "FAAL: the KL radius around the uniform class weights (their run's 0.5)")
    faal_divergence: str = opt("code", "FAAL: the ball: code (KL(u || q), their cvxpy problem) or "
                                       "tilting (KL(q || u), exponential tilting)")


def check(cfg) -> None:
    """FAALParams' ranges."""
    check_range("faal_r", cfg.faal_r, 0.0, math.inf)
    check_choice("faal_divergence", cfg.faal_divergence, DIVERGENCES)


class FAAL(MethodState):
    """faal: no state across steps; each batch's class weights come from its own margins."""

    def loss(self, y, logits_adv, logits_nat):
        logits = kernels.upcast(logits_adv)
        q = faal_weights(F.softmax(logits.detach(), dim=1), y, self.num_classes, self.cfg.faal_r,
                         self.cfg.faal_divergence)
        return weighted_loss(F.cross_entropy(logits, y, reduction="none"), y, q), self.zero()


METHOD = Method(bases={"faal": "madry"}, titles={"faal": "FAAL"}, state=FAAL, params=FAALParams,
                check=check, fine_tune=True, official_attack_bn="eval",
                alone="it fine-tunes another run's model (init_from), which a fused group does not load",
                source="Zhang et al., CVPR 2024; github.com/TrustAI/FAAL")
