"""The contract fastfat's AutoAttack attacks share: the logits callable they attack, per-sample eps,
the keyed random streams, the DLR losses, and the signatures the ensemble calls.

Every attack has the form
    attack(logits_fn, x, y, eps, *, rng, <its settings>) -> x_adv
x [N, C, H, W] in [0, 1] (fp32, or float64 in exactness tests); y [N] int64; eps [N] (pixel units,
x's dtype): the l_inf radius of each row, so every eps_test of a batch shares one working batch;
rng: a Rng (below). Returns x_adv [N, C, H, W] in the ball and the box: an adversarial example for
each row the attack fooled, anything in the ball elsewhere (the ensemble checks logits_fn(x_adv)).
The ensemble (fastfat.autoattack.ensemble) calls, in this order, on the rows still robust:
    apgd_ce(logits_fn, x, y, eps, *, rng, n_iter, rho)
    apgd_t(logits_fn, x, y, eps, *, rng, n_iter, rho, n_target_classes)
    fab_t(logits_fn, x, y, eps, *, rng, n_iter, n_target_classes)          # fab.py
    square(logits_fn, x, y, eps, *, rng, n_queries, p_init)                # square.py
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..runtime import autocast, chunk_size, shard_count, sharded


class Logits(nn.Module):
    """logits_fn: model(x) with x cast to the model's dtype and layout, the forward under autocast
    at `amp`, the logits fp32 [N, num_classes] (float64 for a float64 model: exactness tests).

    On the CPU the batch is split as fastfat's own attacks split it (runtime.sharded: `threads`
    single-threaded workers, cache-sized slices), forward and backward. Samples are independent in
    eval mode, so only the rounding of the batch shapes changes. Call it under grad with
    x.requires_grad for autograd through it (FAB's Jacobians), or use loss_grad (APGD: one
    forward and backward per slice on its worker, nothing retained)."""

    def __init__(self, model: nn.Module, amp: torch.dtype | None = None, threads: int | None = None,
                 keep_float64: bool = False):
        super().__init__()
        self.model, self.amp, self.threads = model, amp, threads
        f64 = any(p.dtype == torch.float64 for p in model.parameters())
        self.dtype = torch.float64 if f64 else torch.float32
        # pyautoattack needs fp32 logits (FAB fails on float64); fastfat's attacks keep float64
        self.out_dtype = torch.float64 if (f64 and keep_float64) else torch.float32
        conv = next((q for q in model.parameters() if q.dim() == 4), None)
        cl = conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
            and not conv.is_contiguous()
        self.layout = torch.channels_last if cl else torch.contiguous_format

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits of x (any slice), on the calling thread."""
        x = x.to(dtype=self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.layout)
        with autocast(x.device, self.amp):
            return self.model(x).to(self.out_dtype)

    def split(self, x: torch.Tensor) -> tuple[int, int | None]:
        return shard_count(x, self.threads), chunk_size(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shards, chunk = self.split(x)
        if shards == 1 and (chunk is None or x.shape[0] <= chunk):
            return self.logits(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SplitLogits.apply(x, self)

        def run(sl):
            with torch.no_grad():
                return self.logits(x[sl])
        return torch.cat(sharded(run, x.shape[0], shards, chunk))

    def loss_grad(self, x: torch.Tensor, loss_fn, *args: torch.Tensor):
        """(logits [N, K], loss [N], d sum(loss) / dx [N, C, H, W]) for a per-sample loss
        loss_fn(logits, *args_rows): each slice's forward and backward on its own worker. args are
        [N, ...] tensors sliced with x."""
        def run(sl):
            xs = x[sl].detach().requires_grad_()
            with torch.enable_grad():   # grad mode is per thread
                out = self.logits(xs)
                loss = loss_fn(out, *(a[sl] for a in args))
                g, = torch.autograd.grad(loss.sum(), xs)
            return out.detach(), loss.detach(), g.to(x.dtype)
        parts = sharded(run, x.shape[0], *self.split(x))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts))


class _SplitLogits(torch.autograd.Function):
    """Logits' forward slice by slice on the shard workers, each slice keeping its own graph; the
    backward takes each slice's input gradient on the same workers. Graphs are retained: FAB
    calls backward once per class on the same logits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: Logits) -> torch.Tensor:
        shards, chunk = logits.split(x)

        def run(sl):
            xs = x[sl].detach().requires_grad_()
            with torch.enable_grad():
                return sl, xs, logits.logits(xs)
        ctx.parts, ctx.split = sharded(run, x.shape[0], shards, chunk), (x.shape[0], shards, chunk)
        return torch.cat([out.detach() for _, _, out in ctx.parts])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = {sl.start: (xs, out) for sl, xs, out in ctx.parts}

        def run(sl):
            xs, out = parts[sl.start]
            return torch.autograd.grad(out, xs, grad[sl], retain_graph=True)[0]
        return torch.cat(sharded(run, *ctx.split)), None


@contextlib.contextmanager
def input_grads_only(model: nn.Module):
    """requires_grad False on every parameter for the block (restored after): only input
    gradients are taken, and no parameter's .grad is touched."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in flags:
            p.requires_grad_(r)


@contextlib.contextmanager
def channels_last_on_cpu(model: nn.Module, x: torch.Tensor):
    """The model's conv weights in channels_last for the block when x is a CPU image batch (put
    back after). On this kind of CPU an attack step of the small digits CNN is about 1.4x faster
    so (bench.autoattack); the numbers change only by fp32 rounding."""
    conv = next((q for q in model.parameters() if q.dim() == 4), None)
    if x.device.type != "cpu" or x.dim() != 4 or conv is None or \
            (conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Random numbers: keyed per (batch, eps index), reseeded for every attack

class Rng:
    """The random numbers of one attack on one batch: the seed of each eps group (the (batch, eps)
    cell's eval_noise_seed(seed, batch, "aa", e), the seed pyautoattack gets, fresh for every
    attack as pyautoattack reseeds before each), and for each working row its group and its
    position (sample index) in the batch of n samples. Two ways to draw:

    - draw(): one device generator per group; it draws the numbers of the whole group
      ([n, *shape] per generator, in a fixed order) and returns the rows asked for, so a row's
      numbers depend only on (seed, batch, eps, sample, how many draws came before) and not on
      which other rows are still being attacked or how the batch is sharded;
    - stream(): pyautoattack's own draw, torch.rand((rows of the group, *shape)) from a CPU
      generator per group (the rows in sample order), so APGD starts where pyautoattack's does.
    Either way nothing depends on the other eps sharing the working batch."""

    def __init__(self, seeds: list[int], group: torch.Tensor, pos: torch.Tensor, n: int, device):
        self.seeds = list(seeds)
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        self.cpu_gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.group, self.pos, self.n = group, pos, n   # [N] int64 each

    def rows(self, keep: torch.Tensor) -> "Rng":
        """The same streams for a subset of the rows (keep: [N] bool or int64 indices)."""
        r = Rng.__new__(Rng)
        r.seeds, r.gens, r.cpu_gens, r.n = self.seeds, self.gens, self.cpu_gens, self.n
        r.group, r.pos = self.group[keep], self.pos[keep]
        return r

    def draw(self, shape, dtype=torch.float32, kind: str = "rand") -> torch.Tensor:
        """[N, *shape] numbers (kind: rand U[0,1) | randn), row i from its group's draw for its
        sample: all groups draw, so the streams advance alike whatever the rows are."""
        fn = torch.rand if kind == "rand" else torch.randn
        device = self.group.device
        full = torch.stack([fn((self.n, *shape), generator=g, dtype=dtype, device=device)
                            for g in self.gens])
        return full[self.group, self.pos]

    def stream(self, shape) -> torch.Tensor:
        """[N, *shape] fp32 U[0, 1): per group, torch.rand((rows of the group, *shape)) from its CPU
        generator, as pyautoattack draws from its reseeded global generator (then moved to the
        rows' device). Rows must come group by group in sample order (the ensemble's do)."""
        group = self.group.cpu()
        out = torch.empty((group.numel(), *shape))
        for g, gen in enumerate(self.cpu_gens):
            rows = (group == g).nonzero()[:, 0]
            if rows.numel():
                out[rows] = torch.rand((rows.numel(), *shape), generator=gen)
        return out.to(self.group.device)


# ---------------------------------------------------------------------------------------------
# Losses (per sample, logits [N, K] -> [N])

def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12), z sorted descending."""
    z, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == y).to(logits.dtype)
    zy = logits.gather(1, y[:, None])[:, 0]
    return -(zy - z[:, -2] * top_is_y - z[:, -1] * (1. - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12), z sorted descending."""
    z = logits.sort(dim=1)[0]
    zy = logits.gather(1, y[:, None])[:, 0]
    zt = logits.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (z[:, -1] - .5 * (z[:, -3] + z[:, -4]) + 1e-12)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


def view_rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """v [N] as [N, 1, 1, 1] (x's rank), to broadcast per-row values over images."""
    return v.view(-1, *([1] * (x.dim() - 1)))
