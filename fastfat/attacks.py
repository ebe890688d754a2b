"""l_inf attacks: PGD with CE, C&W-margin or TRADES-KL objectives, FGSM, and a torchattacks-style class.

All attacks take inputs in [0, 1] (NCHW or channels_last), radii and steps in pixel units as
floats or per-sample tensors [N], and return detached adversarial examples in x's layout.
During the attack the model is in eval mode (restored after), only the input gradient is
computed (parameters' .grad are left as they were), and every update goes through
fastfat.kernels.pgd_step. A model already in eval mode is attacked through its cached BN-folded
copy (fastfat.models.fold.attack_copy), as the trainer attacks its own; fold_bn=False opts out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .models.fold import attack_copy
from .runtime import autocast, chunk_size, shard_count, sharded

ATTACK_LOSSES = ("ce", "cw", "kl")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put model in eval mode for the block and restore each module's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def _as_batch(v, x: torch.Tensor) -> torch.Tensor | float:
    """A radius or step as the kernels take it (kernels.per_sample), after checking that a
    tensor is 0-dim or one value per sample of x."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            return float(v)
        if v.shape != (x.shape[0],):
            raise ValueError(f"per-sample eps/alpha must have shape [{x.shape[0]}], got {list(v.shape)}")
    return kernels.per_sample(v, x)


def uniform_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(-1, 1) noise of x's shape, drawn in contiguous NCHW order whatever x's layout.

    Drawing in one fixed order keeps the random start identical between a channels_last fast
    path and an NCHW reference; times eps it equals torch's uniform_(-eps, eps) bit for bit.
    """
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(-1.0, 1.0, generator=generator)


def start_noise(x: torch.Tensor, loss: str = "ce", random_start: bool = True,
                generator: torch.Generator | None = None, uniform: bool = False) -> torch.Tensor | None:
    """The start noise pgd draws for x [N, C, H, W] from generator: N(0, 1) for "kl" (TRADES),
    U(-1, 1) (uniform_noise) for a random start or with uniform (pgd's start_radius: the
    single-step attacks, any objective), None without one. Fused groups draw each member's start
    with it, from that member's own generator."""
    if uniform:
        return uniform_noise(x, generator)
    if loss == "kl":
        return torch.randn(x.shape, device=x.device, generator=generator)
    return uniform_noise(x, generator) if random_start else None


def sample_group(model: nn.Module) -> int:
    """How many consecutive samples model takes as one unit (a fused model's `sample_group`,
    fastfat.fused: its K members); 1 for any other model."""
    return int(getattr(getattr(model, "_orig_mod", model), "sample_group", 1))


def _objective(kind: str, logits: torch.Tensor, y: torch.Tensor, kappa: float,
               p_nat: torch.Tensor | None) -> torch.Tensor:
    """The scalar the attack ascends: a per-sample objective summed over the batch.

    Summing (not averaging) keeps each sample's gradient independent of the batch size; the
    sign, which is all the update uses, is the same as for the mean.
    """
    if kind == "ce":
        return F.cross_entropy(kernels.upcast(logits), y, reduction="sum")
    if kind == "cw":
        return kernels.cw_margin(logits, y, kappa).sum()
    return kernels.trades_kl(logits, p_nat).sum()


@dataclasses.dataclass(frozen=True)
class PGDOptions:
    """How pgd attacks, apart from the batch, its radii and its random numbers; each field is
    also a keyword of pgd (documented there). One object for callers that attack many batches
    the same way, and for the slices pgd splits a batch into."""
    random_start: bool = True
    loss: str = "ce"
    kappa: float = 50.0
    amp: torch.dtype | None = None
    threads: int | None = None
    group: int | None = None
    fold_bn: bool = True
    batch_stats: bool = False
    start_radius: object = None   # float or [N], or None
    project: bool = True


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, alpha, steps: int,
        random_start: bool = True, loss: str = "ce", kappa: float = 50.0, *,
        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
        target: torch.Tensor | None = None, options: PGDOptions | None = None, **option_fields) -> torch.Tensor:
    """Projected gradient ascent in the l_inf ball of radius eps around x.

    x [N, C, H, W] in [0, 1]; y [N] int64; eps, alpha: float or [N] (pixel units); steps >= 0.
    loss: "ce" (cross-entropy), "cw" (margin with kappa, as the authors' C&W), "kl" (TRADES:
    KL to the natural prediction, start x + 0.001 * N(0, 1) unclamped, as in TRADES).
    random_start ("ce"/"cw"): start at clamp(x + U(-eps, eps), 0, 1), as the authors' code.
    noise: optional start noise of x's shape (U(-1, 1) for ce/cw, N(0, 1) for kl) instead of
    drawing it from `generator` (or torch's global RNG). amp: None (fp32) or the autocast dtype
    of the model's forward (torch.bfloat16 / torch.float16); the objective, its input gradient
    and x_adv stay fp32 (under fp16 the backward is loss-scaled per sample: _input_grad). threads: on the CPU, the batch is split into this many parts attacked
    at once on single-threaded workers (None: torch.get_num_threads(); 1: one worker, the
    caller), each part in slices of at most chunk_size(x) samples. Samples are independent in
    eval mode and the start noise is drawn for the whole batch first, so the split does not
    change the result. group: runs of this many consecutive samples stay in one slice (None: the
    model's sample_group, e.g. K for a fused model of K members, whose forward needs whole runs).
    fold_bn: a model in eval mode is attacked through its BN-folded, parameter-frozen copy
    (fastfat.models.fold.attack_copy: the same eval-mode function, one memory pass fewer per
    conv and no parameter gradients; made once and reused while the weights are unchanged),
    as the trainer attacks; False attacks the model itself. A model in train mode is attacked
    as it is (in eval mode, as always).
    target: for "kl", the logits [N, classes] whose softmax the attack moves away from instead of
    the model's own natural prediction (a teacher's soft labels in robust distillation).
    batch_stats: attack the model in train mode instead (BatchNorm on the batch's statistics, its
    running statistics updated by every forward, as CFA's code crafts its Madry attack); the
    batch stays whole (one slice: its statistics couple the samples), no BN folding.
    start_radius: start at clamp(x + U(-r, r), 0, 1) with r = start_radius (float or [N]) whatever
    the objective, instead of its own start (None): FGSM-RS starts at r = eps, N-FGSM at k * eps. project: False leaves out the projection to the eps-ball (the
    [0, 1] clamp stays), as N-FGSM; the kernels' step then runs with an infinite radius.
    The single-step training attacks are this function at steps 1 (train_attack_args).
    options: a PGDOptions holding the keywords above (random_start, loss, kappa, amp, threads,
    group, fold_bn, batch_stats, start_radius, project) instead of them; keywords given as well
    override its fields, and random_start, loss and kappa then stay at their defaults.
    Returns x_adv [N, C, H, W], detached, in x's memory layout.
    """
    opts = _options(options, random_start, loss, kappa, option_fields)
    if opts.loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {opts.loss!r}; expected one of {ATTACK_LOSSES}")
    x = x.detach()
    single = opts.start_radius is not None
    if opts.batch_stats:
        if noise is None:
            noise = start_noise(x, opts.loss, opts.random_start, generator, single)
        was = model.training
        model.train()
        try:
            out = _pgd_slice(model, x, y, _as_batch(eps, x), _as_batch(alpha, x), steps, opts, noise,
                             target, _start(opts.start_radius, x))
        finally:
            model.train(was)
        return out.contiguous(memory_format=_layout(x))
    if opts.fold_bn and not model.training:
        model = attack_copy(model, opts.amp)
    # Draw the start for the whole batch here, on the caller's thread and generator, so the
    # random stream is the same however the batch is split below.
    if noise is None:
        noise = start_noise(x, opts.loss, opts.random_start, generator, single)
    g = sample_group(model) if opts.group is None else int(opts.group)
    if g < 1 or x.shape[0] % g:
        raise ValueError(f"a batch of {x.shape[0]} samples does not split into runs of {g}")
    shards = min(shard_count(x, opts.threads), x.shape[0] // g)
    chunk = chunk_size(x)
    e, a, r = _as_batch(eps, x), _as_batch(alpha, x), _start(opts.start_radius, x)
    cut = lambda v, sl: v[sl] if isinstance(v, torch.Tensor) else v

    def attack(runs: slice) -> torch.Tensor:
        sl = slice(runs.start * g, runs.stop * g)
        return _pgd_slice(model, x[sl], y[sl], cut(e, sl), cut(a, sl), steps, opts, cut(noise, sl),
                          cut(target, sl), cut(r, sl))

    with eval_mode(model):
        parts = sharded(attack, x.shape[0] // g, max(shards, 1),
                        None if chunk is None else max(1, chunk // g))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.contiguous(memory_format=_layout(x))


def _options(options: PGDOptions | None, random_start: bool, loss: str, kappa: float, fields: dict) -> PGDOptions:
    """pgd's PGDOptions from its options argument and its keywords (TypeError for an unknown one)."""
    if options is None:
        return PGDOptions(random_start=random_start, loss=loss, kappa=kappa, **fields)
    default = PGDOptions()
    if (random_start, loss, kappa) != (default.random_start, default.loss, default.kappa):
        raise TypeError("pgd: give random_start, loss and kappa in options (or as keywords with it)")
    return dataclasses.replace(options, **fields)


def _start(start_radius, x):
    """start_radius as the kernels take a radius, or None (the objective's own start)."""
    return None if start_radius is None else _as_batch(start_radius, x)


def _pgd_slice(model, x, y, e, a, steps: int, opts: PGDOptions, noise, target=None, r=None) -> torch.Tensor:
    """pgd on one slice of the batch, model in the mode the caller set (eval; train under
    batch_stats); noise drawn by the caller; r: the start radius (None: e); opts.project False:
    no eps-ball (an infinite radius in the step, which clamps to [0, 1] only).
    Runs on the thread it is called from, so grad mode and autocast are set here."""
    loss, kappa, amp = opts.loss, opts.kappa, opts.amp
    with torch.enable_grad():
        p_nat = None
        if loss == "kl":
            if target is not None:
                p_nat = kernels.upcast(target.detach())
            else:
                with torch.no_grad(), autocast(x.device, amp):
                    p_nat = kernels.upcast(model(x))
        if r is not None:   # a uniform start of radius r (the single-step attacks), any objective
            x_adv = x.clone()
            x_adv.add_(noise.to(x.dtype) * r).clamp_(0.0, 1.0)
        elif loss == "kl":
            x_adv = (x + 0.001 * noise.to(x.dtype)).contiguous(memory_format=_layout(x))
        elif opts.random_start:
            x_adv = x.clone()
            x_adv.add_(noise.to(x.dtype) * e).clamp_(0.0, 1.0)
        else:
            x_adv = x.clone()
        if not opts.project:
            e = math.inf
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast(x.device, amp):
                logits = model(x_adv)
            grad = _input_grad(loss, logits, y, kappa, p_nat, x_adv, amp)
            x_adv = x_adv.detach()
            if grad.stride() != x_adv.stride():
                # A gradient in another layout (a channels_last model fed NCHW inputs, a compiled
                # backward): one copy into x_adv's, so the fused kernel takes it instead of the
                # torch twin it would fall back to (seven passes).
                grad = grad.contiguous(memory_format=_layout(x_adv))
            kernels.pgd_step(x_adv, x, grad, a, e)
    return x_adv.detach()


def _input_grad(kind, logits, y, kappa, p_nat, x_adv, amp) -> torch.Tensor:
    """d objective / d x_adv for logits = model(x_adv).

    Under fp16 autocast the model's backward runs in fp16, where the logit gradient of a
    confident sample (softmax - onehot, 1e-8 and below) flushes to zero, its input gradient with
    it, and the attack stalls: robustness would be overestimated. So there the objective's
    gradient is taken in fp32 first and each sample's row scaled by a power of two to a largest
    entry in [0.5, 1) (loss scaling per sample: exact, and the update uses only the sign, which
    a positive per-sample factor keeps, samples being independent in eval mode). fp32 and bf16
    (fp32's range) take the plain gradient: their numbers are unchanged.
    """
    if amp != torch.float16:
        return torch.autograd.grad(_objective(kind, logits, y, kappa, p_nat), x_adv)[0]
    z = logits.detach().float().requires_grad_(True)
    (g,) = torch.autograd.grad(_objective(kind, z, y, kappa, p_nat), z)
    _, exponent = torch.frexp(g.abs().amax(dim=1, keepdim=True))
    scale = torch.ldexp(torch.ones_like(g[:, :1]), (-exponent).clamp(max=126))   # 2^127 is fp32's top
    return torch.autograd.grad(logits, x_adv, grad_outputs=(g * scale).to(logits.dtype))[0]


def _layout(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# The training attacks (TrainConfig.train_attack): multi-step PGD, and the two single-step ones,
# which are pgd at one step with their own start and projection (one attack loop, one kernel step).
TRAIN_ATTACKS = ("pgd", "fgsm-rs", "n-fgsm")
SINGLE_STEP = TRAIN_ATTACKS[1:]
# their default step sizes, relative to eps: FGSM-RS (Wong et al., 2020) 1.25 eps, N-FGSM (de Jorge
# et al., 2022) eps
SINGLE_STEP_SIZE = {"fgsm-rs": "1.25*eps", "n-fgsm": "1*eps"}


def train_attack_args(kind: str, steps: int, eps, nfgsm_noise: float = 2.0) -> dict:
    """pgd's steps, start_radius and project for a training attack: "pgd" (`steps` steps from the
    objective's own start, projected), "fgsm-rs" (one step from U(-eps, eps), projected to the
    eps-ball) or "n-fgsm" (one step from U(-k eps, k eps), k = nfgsm_noise, not projected to the
    eps-ball). eps: float or per-sample [N] (pixel units); the step size is the caller's alpha."""
    if kind == "pgd":
        return dict(steps=steps)
    if kind == "fgsm-rs":
        return dict(steps=1, start_radius=eps)
    if kind == "n-fgsm":
        return dict(steps=1, start_radius=nfgsm_noise * eps, project=False)
    raise ValueError(f"unknown training attack {kind!r}; expected one of {TRAIN_ATTACKS}")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, random_start: bool = True,
         **kw) -> torch.Tensor:
    """FGSM as the authors evaluate it: a random start in the ball, then one CE step of size eps.

    x [N, C, H, W] in [0, 1]; eps float or [N]. Returns x_adv, detached.
    """
    return pgd(model, x, y, eps, eps, 1, random_start=random_start, loss="ce", **kw)


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, alpha, steps: int = 30,
           kappa: float = 50.0, random_start: bool = True, **kw) -> torch.Tensor:
    """C&W-inf: PGD on the margin loss -clamp(z_y - max_{j!=y} z_j + kappa, min=0).

    The authors' evaluation: 30 steps of eps/4 from a random start, kappa 50.
    """
    return pgd(model, x, y, eps, alpha, steps, random_start=random_start, loss="cw", kappa=kappa, **kw)


class PGD:
    """torchattacks-compatible PGD: `atk = PGD(model, eps=8/255, alpha=2/255, steps=10); atk(x, y)`.

    Same convention as torchattacks.PGD (random uniform start, CE, sign steps, projection and
    clamp to [0, 1]), on fastfat's kernels. Code written for torchattacks can switch by
    changing its import.
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, random_start: bool = True):
        self.model, self.eps, self.alpha = model, eps, alpha
        self.steps, self.random_start = steps, random_start

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return pgd(self.model, images.to(device), labels.to(device), self.eps, self.alpha,
                   self.steps, random_start=self.random_start)

    __call__ = forward

    def __repr__(self) -> str:
        return (f"PGD(model_name={type(self.model).__name__}, eps={self.eps}, alpha={self.alpha}, "
                f"steps={self.steps}, random_start={self.random_start})")
