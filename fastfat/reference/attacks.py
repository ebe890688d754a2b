"""The reference attacks in the authors' shape: PGD (attack_generator.py's pgd and TRADES' KL
attack), FGSM-RS, N-FGSM, FGSM and CW."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def working_copy(x: torch.Tensor) -> torch.Tensor:
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
    data = working_copy(x)
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
