"""Square attack (l_inf, margin loss): random square updates at the corners of each sample's
eps-ball, queries batched over the samples and eps of a working batch, a sample leaving as soon as
it is misclassified.

The specification is pyautoattack 0.2.0's SquareAttack in the standard version (n_queries 5000,
p_init 0.8, one restart, margin loss, the p schedule rescaled to n_queries). Its random numbers
are pyautoattack's own, per eps group: from the group's CPU generator (rng.stream, seeded as
pyautoattack reseeds its global generator before the attack), the start stripes of +-eps for the
group's rows in sample order, then for every query one square (row, column, per-channel signs)
shared by the group's rows, as pyautoattack shares it by batch. So with the same seed and rows,
the queries are pyautoattack's and the iterates differ only by the model's rounding; a row's
answer does not depend on the other eps groups of the working batch or on the sharding.
"""
from __future__ import annotations

import math

import torch

# pyautoattack's p schedule: on the iteration rescaled to 10,000 queries, p halves after each
THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def compact_every(device: torch.device) -> int:
    """How often (in queries) the working batch drops its fooled rows: on CUDA every 50, as
    dropping is a host sync (fooled rows in between are computed and left unchanged); 0 on the
    CPU: whenever a row was fooled (the check is free there)."""
    return 0 if device.type == "cpu" else 50


def p_schedule(i: int, n_queries: int, p_init: float) -> float:
    """The fraction of pixels the square covers at iteration i (0-based) of n_queries."""
    it = int(i / n_queries * 10000)
    return p_init / 2 ** sum(it > t for t in THRESHOLDS)


def square_side(i: int, n_queries: int, p_init: float, c: int, h: int, w: int) -> int:
    """The square's side in pixels at iteration i: about sqrt(p * H * W), between 1 and min(H, W)."""
    p = p_schedule(i, n_queries, p_init)
    return min(max(int(round(math.sqrt(p * (c * h * w) / c))), 1), min(h, w))


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N] z_y - max_{j != y} z_j: <= 0 once the sample is misclassified."""
    zy = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1)[0]
    return zy - others


def _sign(u: torch.Tensor) -> torch.Tensor:
    return torch.sign(2 * u - 1)


def square(logits_fn, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *, rng,
           n_queries: int = 5000, p_init: float = 0.8) -> torch.Tensor:
    """Square attack (l_inf) on each sample of x at its radius.

    logits_fn: [M, C, H, W] -> logits [M, K] (no gradients taken); x [N, C, H, W] in [0, 1];
    y [N] int64; eps [N] (pixel units, x's dtype); rng: common.Rng of these rows (its CPU
    generators, one per eps group, and each row's group; rows group by group in sample order, as
    rng.stream needs). Returns x_adv [N, C, H, W]: the best point
    found for each sample it misclassified (in the ball and the box), x elsewhere."""
    n, c, h, w = x.shape
    x = x.detach()
    dev = x.device
    e = eps.to(x.dtype).view(-1, 1, 1, 1)
    with torch.no_grad():
        correct = logits_fn(x).argmax(1) == y               # the others are left as they are
        # pyautoattack draws the start for the correctly classified rows only
        start = torch.zeros((n, c, 1, w), dtype=x.dtype, device=dev)
        start[correct] = rng.rows(correct).stream([c, 1, w]).to(x.dtype)
        x_best = (x + e * _sign(start)).clamp(0.0, 1.0)
        m_best = margin(logits_fn(x_best), y).masked_fill(~correct, float("-inf"))
        # per group, per query: square row, column, then C signs, in pyautoattack's draw order
        # on the same generator after the start (one transfer to the device, before the loop)
        draws = torch.stack([torch.rand((n_queries, 2 + c), generator=g)
                             for g in rng.cpu_gens]).to(dev)
        # the state of rows that left the working batch (written back at each compaction)
        done_best, done_m = x_best.clone(), m_best.clone()
        idx = torch.arange(n, device=dev)
        grp, xs, ys, es, xb, mb = rng.group, x, y, e, x_best, m_best
        hh = torch.arange(h, device=dev).view(1, 1, h, 1)
        ww = torch.arange(w, device=dev).view(1, 1, 1, w)
        every = compact_every(dev)
        for i in range(n_queries):
            if (i % every == 0) if every else (i == 0 or bool((mb <= 0).any())):
                done_best[idx], done_m[idx] = xb, mb
                keep = (mb > 0).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                idx, grp, xs, ys, es, xb, mb = (v[keep] for v in (idx, grp, xs, ys, es, xb, mb))
            s = square_side(i, n_queries, p_init, c, h, w)
            u = draws[grp, i]                                    # [R, 2 + C]
            vh = ((h - s) * u[:, 0]).long().view(-1, 1, 1, 1)
            vw = ((w - s) * u[:, 1]).long().view(-1, 1, 1, 1)
            inside = (hh >= vh) & (hh < vh + s) & (ww >= vw) & (ww < vw + s)
            step = 2 * es * _sign(u[:, 2:]).to(x.dtype).view(-1, c, 1, 1)
            x_new = torch.where(inside, xb + step, xb)
            x_new = torch.min(torch.max(x_new, xs - es), xs + es).clamp(0.0, 1.0)
            m_new = margin(logits_fn(x_new), ys)
            # keep the query if it lowers the margin or misclassifies (rows already fooled stay)
            better = ((m_new < mb) | (m_new <= 0)) & (mb > 0)
            mb = torch.where(better, m_new, mb)
            xb = torch.where(better.view(-1, 1, 1, 1), x_new, xb)
        done_best[idx], done_m[idx] = xb, mb
        fooled = correct & (done_m <= 0)
    return torch.where(fooled.view(-1, 1, 1, 1), done_best, x)
