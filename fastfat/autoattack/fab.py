"""FAB-T (targeted Fast Adaptive Boundary, l_inf): every sample's target classes in one working
batch, per-sample eps, a sample leaving as soon as one of its targets fools it within its eps.

The specification is pyautoattack 0.2.0's FABAttack_targeted (fab_base.py, fab_pt.py,
fab_projections.py) in the standard version: n_iter 100, one restart (pyautoattack starts its
first restart at x itself, so FAB-T draws no random numbers), alpha_max 0.1, eta 1.05, beta 0.9,
target k = the class with the k-th largest clean logit, k = 2 .. n_target_classes + 1.

Where it differs from pyautoattack, the verdict cannot change:
- pyautoattack runs the targets one after another, each on the samples the earlier ones left
  robust; the iterates of a (sample, target) pair depend on nothing else, so running all pairs side
  by side gives the same pairs' iterates (up to the model's fp32 rounding of a different batch);
- pyautoattack keeps a pair for all n_iter iterations and returns its smallest adversarial
  perturbation; the sample is fooled iff that norm is <= eps, i.e. iff some iterate was
  adversarial within eps (the norm only decreases), so a sample stops at its first such iterate,
  which is the x_adv returned (within eps, not the minimal one).
"""
from __future__ import annotations

import math

import torch

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9


def compact_every(device: torch.device) -> int:
    """How often (in iterations) the working batch drops its fooled samples: every iteration on
    the CPU; on CUDA every 10, as dropping is a host sync (fooled samples in between are computed
    and ignored)."""
    return 1 if device.type == "cpu" else 10


def projection_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest l_inf step d [R, D] that takes each point t [R, D] (in [0, 1]^D) onto its
    hyperplane w . z = b (w [R, D], b [R]) while t + d stays in the box [0, 1]^D, or as close to
    the hyperplane as the box allows. Each row independent; no host sync.

    FAB's l_inf projection with pyautoattack's arithmetic (equal in float64): coordinates sorted
    by how far they can move toward the hyperplane, a bisection over that order for the smallest
    radius lambda that reaches it, each coordinate then moving by at most lambda within the box."""
    side = 2 * ((w * t).sum(1) - b >= 0) - 1            # orient w so t lies on its positive side
    w = w * side.unsqueeze(1)
    b = b * side
    a = (w < 0).to(t.dtype)                              # box corner each coordinate moves toward
    moves = (w != 0).to(t.dtype)
    d = (a - t) * moves                                  # the step to that corner
    p = a - t * (2 * a - 1)                              # room to move per coordinate
    order = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    desc = order.flip((1,))
    ws = w.gather(1, desc)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(-ws * d.gather(1, desc), dim=1) + b0.unsqueeze(1)

    # the hyperplane beyond even the largest radius (c_l) or reached at some radius (bisected)
    b_all = sb[:, -1] - s[:, -1] * p.gather(1, order[:, 0:1]).squeeze(1)
    far = b - b_all > 0
    mid_case = (b - b0 > 0) & ~far
    n = w.shape[1]
    lb = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    ub = torch.full_like(lb, n - 1)
    for _ in range(math.ceil(math.log2(n))):
        mid = (lb + ub) // 2
        col = mid.unsqueeze(1)
        cur = order.gather(1, n - 1 - col)
        b_mid = (sb.gather(1, col) - s.gather(1, col) * p.gather(1, cur)).squeeze(1)
        up = b - b_mid > 0
        lb = torch.where(up, mid, lb)
        ub = torch.where(up, ub, mid)

    lam_far = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), min=0).unsqueeze(-1)
    col = lb.unsqueeze(1)
    lam = torch.clamp_min((b - sb.gather(1, col).squeeze(1)) / (-s.gather(1, col).squeeze(1)),
                          min=0).unsqueeze(-1)
    d_mid = torch.min(lam, d) * a + torch.max(-lam, d) * (1 - a)
    d = torch.where(far.unsqueeze(1), (2 * a - 1) * lam_far,
                    torch.where(mid_case.unsqueeze(1), d_mid, d))
    return d * moves


def _targets(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] the classes of the 2nd .. (k+1)-th largest logits, as pyautoattack picks them."""
    order = logits.sort(dim=-1)[1]
    return torch.stack([order[:, -c] for c in range(2, k + 2)], dim=1)


def _step(x1: torch.Tensor, x0: torch.Tensor, df: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    """One FAB step of rows x1 [R, D] (originals x0 [R, D]) toward the linearised boundary
    df + dg . (z - x1) = 0: projections from x1 and from x0, mixed by their sizes."""
    r = x1.shape[0]
    b = -df + (dg * x1).sum(dim=-1)
    d3 = projection_linf(torch.cat((x1, x0), 0), torch.cat((dg, dg), 0), torch.cat((b, b), 0))
    a0 = d3.abs().max(dim=1, keepdim=True)[0].clamp_min(1e-8)
    a1, a2 = a0[:r], a0[r:]
    alpha = (a1 / (a1 + a2)).clamp_min(0).clamp_max(ALPHA_MAX)
    return ((x1 + ETA * d3[:r]) * (1 - alpha) + (x0 + d3[r:] * ETA) * alpha).clamp(0.0, 1.0)


def fab_t(logits_fn, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *, rng=None,
          n_iter: int = 100, n_target_classes: int = 9) -> torch.Tensor:
    """Targeted FAB (l_inf) on each sample of x at its radius.

    logits_fn: [M, C, H, W] -> logits [M, K] (autograd through it); x [N, C, H, W] in [0, 1];
    y [N] int64; eps [N] (pixel units, x's dtype); rng: unused (the single restart starts at x; taken
    for the ensemble's common signature). n_target_classes is capped at K - 1.
    Returns x_adv [N, C, H, W]: for each sample fooled, at the first iteration where an iterate of
    one of its targets is misclassified within eps, that of the lowest such target (in the box);
    x elsewhere, misclassified samples too."""
    n = x.shape[0]
    x_adv = x.detach().clone()
    if n == 0:
        return x_adv
    with torch.no_grad():
        clean = logits_fn(x_adv)
    k = min(n_target_classes, clean.shape[1] - 1)
    shape, dim = x.shape[1:], x[0].numel()
    # working batch: samples [S] x targets [k], state as rows [S * k, D]
    idx = torch.arange(n, device=x.device)
    la = y
    la_t = _targets(clean, k)
    x0 = x_adv.reshape(n, 1, dim).expand(n, k, dim)
    x1 = x0.clone()
    e = eps.to(x.dtype)
    active = clean.argmax(1) == y
    every = compact_every(x.device)
    for it in range(n_iter):
        if it % every == 0:
            keep = active.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            idx, la, la_t, x0, x1, e, active = (v[keep] for v in (idx, la, la_t, x0, x1, e, active))
        s = idx.shape[0]
        rows_y = la.unsqueeze(1).expand(s, k).reshape(-1)
        rows_t = la_t.reshape(-1)
        u = torch.arange(s * k, device=x.device)
        xg = x1.reshape(s * k, *shape).detach().requires_grad_()
        with torch.enable_grad():
            out = logits_fn(xg)
            diff = -(out[u, rows_y] - out[u, rows_t])   # > 0 once the target beats the label
            dg, = torch.autograd.grad(diff.sum(), xg)
        with torch.no_grad():
            x1 = _step(x1.reshape(s * k, dim), x0.reshape(s * k, dim), diff.detach(),
                       dg.reshape(s * k, dim).to(x.dtype)).view(s, k, dim)
            fooled = (logits_fn(x1.view(s * k, *shape)).argmax(1) != rows_y).view(s, k)
            dist = (x1 - x0).abs().max(dim=2)[0]
            win = fooled & (dist <= e.unsqueeze(1)) & active.unsqueeze(1)
            hit = win.any(1)
            first = win.int().argmax(1)              # the lowest target that fooled it
            best = x1[torch.arange(s, device=x.device), first].view(s, *shape)
            x_adv[idx] = torch.where(hit.view(-1, *([1] * len(shape))), best, x_adv[idx])
            active = active & ~hit
            # an adversarial iterate is pulled back toward the original (beta) and searched on
            x1 = torch.where(fooled.unsqueeze(2), x0 + (x1 - x0) * BETA, x1)
    return x_adv
