"""Square attack (l_inf, margin loss): random square updates at the corners of each sample's
eps-ball, queries batched over the samples and eps of a working batch and, speculatively, over the
next queries of each sample; a sample leaving as soon as it is misclassified.

The specification is pyautoattack 0.2.0's SquareAttack in the standard version (n_queries 5000,
p_init 0.8, one restart, margin loss; the p schedule on the query index itself, not rescaled to
n_queries: AutoAttack builds its SquareAttack with resc_schedule=False). Its random numbers
are pyautoattack's own, per eps group: from the group's CPU generator (rng.stream, seeded as
pyautoattack reseeds its global generator before the attack), the start stripes of +-eps for the
group's rows in sample order, then for every query one square (row, column, per-channel signs)
shared by the group's rows, as pyautoattack shares it by batch. So with the same seed and rows,
the queries are pyautoattack's and the iterates differ only by the model's rounding; a row's
answer does not depend on the other eps groups of the working batch or on the sharding.

Why the queries of one sample can share a forward although each depends on the last accepted one:
a rejected query leaves the sample's state (best point, best margin) as it was, so queries
i, i+1, ..., i+K-1 built from the same state are exactly the queries the sequential attack makes
until the first of them is accepted. Each round builds K candidates per sample from its state,
evaluates them in one forward, and takes the first accepted one (the candidates after it are
discarded, the next round starts after it); with none accepted the sample moves on K queries. The
iterates are the sequential attack's, query for query. A candidate equal to the current best
point (its square already holds those signs: about half the late single-pixel queries of a grey
image) cannot be accepted (its margin is the best margin, and acceptance needs a lower one), so on
the CPU it is not evaluated.

Measured on this 2-core CPU, one thread, on the samples APGD leaves robust at eps 0.2 and 0.25
(bench.autoattack's models): ResNet18 width 16 (12 rows; a forward of 12 costs ~2 ms, mostly
per-call overhead) 10.7 s -> 2.1 s, 125 forwards instead of 5,002, with 15% more rows evaluated
than the sequential attack's; the digits CNN (102 rows, compute-bound) 24.4 s -> 13.1 s, the
skipped repeats halving its rows. SPECULATE_ROWS = 512 was the fastest of 64 .. 2048 on both.
"""
from __future__ import annotations

import math

import torch

# pyautoattack's p schedule: p halves after each of these query indices (on the index rescaled to
# 10,000 queries when rescale is asked for, SquareAttack's own default; AutoAttack's is not)
THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SPECULATE_ROWS = 512    # candidates per forward the speculation aims at (CPU)
MAX_AHEAD = 128         # at most this many queries of one sample per round


def compact_every(device: torch.device) -> int:
    """How often (in rounds) the working batch drops its finished rows: on CUDA every 50, as
    dropping is a host sync (finished rows in between are computed and left unchanged, and every
    candidate is evaluated); 0 on the CPU: whenever a row finished, and candidates that cannot be
    accepted are skipped (the check is free there)."""
    return 0 if device.type == "cpu" else 50


def queries_ahead(rows: int, device: torch.device) -> int:
    """K, the queries of each sample one round evaluates: enough to fill a forward of
    SPECULATE_ROWS candidates (1 when the rows alone fill it: a discarded candidate is then pure
    cost), at most MAX_AHEAD; on CUDA 4 (a GPU's forward is cheap per row up to large batches)."""
    if device.type != "cpu":
        return 4
    return max(1, min(MAX_AHEAD, SPECULATE_ROWS // max(rows, 1)))


def p_schedule(i: int, n_queries: int, p_init: float, rescale: bool = False) -> float:
    """The fraction of pixels the square covers at iteration i (0-based) of n_queries; rescale:
    on i rescaled to 10,000 queries (pyautoattack's resc_schedule; the standard AutoAttack has it
    off, so with 5000 queries the last halving comes at query 4000)."""
    it = int(i / n_queries * 10000) if rescale else i
    return p_init / 2 ** sum(it > t for t in THRESHOLDS)


def square_side(i: int, n_queries: int, p_init: float, c: int, h: int, w: int,
                rescale: bool = False) -> int:
    """The square's side in pixels at iteration i: about sqrt(p * H * W), between 1 and min(H, W)."""
    p = p_schedule(i, n_queries, p_init, rescale)
    return min(max(int(round(math.sqrt(p * (c * h * w) / c))), 1), min(h, w))


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N] z_y - max_{j != y} z_j: <= 0 once the sample is misclassified."""
    zy = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1)[0]
    return zy - others


def _sign(u: torch.Tensor) -> torch.Tensor:
    return torch.sign(2 * u - 1)


def _queries(rng, n_queries: int, p_init: float, c: int, h: int, w: int, dev, dtype, rescale: bool):
    """Every query of every eps group, in pyautoattack's draw order on the group's generator
    after the start (per query: square row, column, then C signs): side [Q] and, per group,
    top row [G, Q], left column [G, Q], signs [G, Q, C]."""
    draws = torch.stack([torch.rand((n_queries, 2 + c), generator=g) for g in rng.cpu_gens])
    side = torch.tensor([square_side(i, n_queries, p_init, c, h, w, rescale) for i in range(n_queries)])
    vh = ((h - side) * draws[..., 0]).long()
    vw = ((w - side) * draws[..., 1]).long()
    return side.to(dev), vh.to(dev), vw.to(dev), _sign(draws[..., 2:]).to(dev, dtype)


def square(logits_fn, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *, rng,
           n_queries: int = 5000, p_init: float = 0.8, rescale: bool = False) -> torch.Tensor:
    """Square attack (l_inf) on each sample of x at its radius.

    logits_fn: [M, C, H, W] -> logits [M, K] (no gradients taken); x [N, C, H, W] in [0, 1];
    y [N] int64; eps [N] (pixel units, x's dtype); rng: common.Rng of these rows (its CPU
    generators, one per eps group, and each row's group; rows group by group in sample order, as
    rng.stream needs). rescale: the p schedule rescaled to n_queries (pyautoattack's
    SquareAttack default; off in its AutoAttack, and here). Returns x_adv [N, C, H, W]: the best point
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
        side, top, left, signs = _queries(rng, n_queries, p_init, c, h, w, dev, x.dtype, rescale)
        # the state of rows that left the working batch (written back at each compaction)
        done_best, done_m = x_best.clone(), m_best.clone()
        idx = torch.arange(n, device=dev)
        nxt = torch.zeros(n, dtype=torch.long, device=dev)    # each row's next query
        grp, xs, ys, es, xb, mb = rng.group, x, y, e, x_best, m_best
        hh = torch.arange(h, device=dev).view(1, 1, 1, h, 1)
        ww = torch.arange(w, device=dev).view(1, 1, 1, 1, w)
        every, k = compact_every(dev), queries_ahead(n, dev)
        finished = (mb <= 0) | (nxt >= n_queries)    # rows the next compaction drops
        for rnd in range(n_queries):        # a round moves every row on by at least one query
            if (rnd % every == 0) if every else bool(finished.any()):
                done_best[idx], done_m[idx] = xb, mb
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                idx, grp, nxt, xs, ys, es, xb, mb = (v[keep] for v in (idx, grp, nxt, xs, ys, es, xb, mb))
                k = queries_ahead(idx.numel(), dev)
            r = idx.numel()
            q = nxt[:, None] + torch.arange(k, device=dev)            # [R, K] query indices
            valid = q < n_queries
            q = q.clamp(max=n_queries - 1)
            g = grp[:, None]
            s = side[q].view(r, k, 1, 1, 1)
            vh, vw = top[g, q].view(r, k, 1, 1, 1), left[g, q].view(r, k, 1, 1, 1)
            inside = (hh >= vh) & (hh < vh + s) & (ww >= vw) & (ww < vw + s)
            step = 2 * es[:, None] * signs[g, q].view(r, k, c, 1, 1)
            cand = torch.where(inside, xb[:, None] + step, xb[:, None])
            cand = torch.min(torch.max(cand, xs[:, None] - es[:, None]), xs[:, None] + es[:, None]).clamp(0.0, 1.0)
            # a candidate equal to the best point cannot be accepted; finished rows propose nothing
            live = valid & (mb > 0)[:, None]
            if not every:
                live &= (cand != xb[:, None]).flatten(2).any(2)
                m_new = torch.full((r, k), float("inf"), dtype=mb.dtype, device=dev)
                at = live.nonzero()
                if at.numel():
                    rr, kk = at[:, 0], at[:, 1]
                    m_new[rr, kk] = margin(logits_fn(cand[rr, kk]), ys[rr]).to(mb.dtype)
            else:
                m_new = margin(logits_fn(cand.flatten(0, 1)), ys.repeat_interleave(k)).view(r, k).to(mb.dtype)
            # the sequential rule: take a query if it lowers the margin (or misclassifies)
            accept = live & ((m_new < mb[:, None]) | (m_new <= 0))
            hit = accept.any(1)
            first = accept.to(torch.int8).argmax(1)                    # the first accepted query
            rows = torch.arange(r, device=dev)
            xb = torch.where(hit.view(-1, 1, 1, 1), cand[rows, first], xb)
            mb = torch.where(hit, m_new[rows, first], mb)
            nxt = torch.where(hit, nxt + first + 1, nxt + k)
            finished = (mb <= 0) | (nxt >= n_queries)
        done_best[idx], done_m[idx] = xb, mb
        fooled = correct & (done_m <= 0)
    return torch.where(fooled.view(-1, 1, 1, 1), done_best, x)
