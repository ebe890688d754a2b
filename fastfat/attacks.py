"""l_inf attacks: PGD with CE, C&W-margin or TRADES-KL objectives, FGSM, and a torchattacks-style class.

All attacks take inputs in [0, 1] (NCHW or channels_last), radii and steps in pixel units as
floats or per-sample tensors [N], and return detached adversarial examples in x's layout.
During the attack the model is in eval mode (restored after), only the input gradient is
computed (parameters' .grad are left as they were), and every update goes through
fastfat.kernels.pgd_step.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

ATTACK_LOSSES = ("ce", "cw", "kl")
MIN_SHARD = 8   # samples per CPU worker below which splitting the batch costs more than it saves
# Samples x height x width of the largest slice a CPU worker attacks at a time (64 CIFAR images).
# A large batch's activations overflow the caches and the memory-bound ops (ReLU, residual adds
# and their backward) slow down; measured here, one attack step of ResNet18 width 16 on 512
# CIFAR-sized samples took 495 ms in one piece, 377 ms as 128-sample slices, 369 ms as 64
# (width 64: 256 samples 2.72 s at once, 2.47 s as 64s).
CHUNK_PIXELS = 64 * 32 * 32


# ---------------------------------------------------------------------------------------------
# CPU batch sharding
#
# torch's intra-op parallelism splits every op across the cores and meets at a barrier after
# each one: hundreds of barriers per PGD step, and on a small shared CPU one descheduled thread
# stalls the other at every one of them (measured here, ResNet18 width 16, batch 128, PGD-10,
# with other jobs on the two cores: a FAT training step took 5.1 s with the attack on 2 OpenMP
# threads, 2.3 s with it as two 64-sample halves on two single-threaded workers; on an idle
# machine the split is still 4% (128 samples) to 9% (512) faster for a 10-step attack).
# An attack in eval mode treats samples independently, so each core can take a contiguous slice
# of the batch with no barrier until the join.

class _ShardPool:
    """Daemon worker threads, each with a single torch intra-op thread, running one job each."""

    def __init__(self, n: int):
        self.n = n
        self.pid = os.getpid()
        self.lock = threading.Lock()          # one sharded call at a time
        self.jobs = [queue.Queue() for _ in range(n)]
        self.idents: set[int] = set()
        keep = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        for i in range(n):
            threading.Thread(target=self._work, args=(i, ready), daemon=True,
                             name=f"fastfat-shard-{i}").start()
        ready.wait()
        # torch.set_num_threads in a worker also sets the process-wide default that new threads
        # start from; the workers have taken theirs, so put the caller's back.
        torch.set_num_threads(keep)

    def _work(self, i: int, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()    # initialise this thread's OpenMP count now, at 1
        self.idents.add(threading.get_ident())
        ready.wait()
        while True:
            fn, arg, done = self.jobs[i].get()
            try:
                done.put((i, fn(arg), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
                done.put((i, None, e))

    def map(self, fn, args: list) -> list:
        """[fn(a) for a in args], job i on worker i; the first exception is re-raised here."""
        with self.lock:
            done = queue.Queue()
            for i, a in enumerate(args):
                self.jobs[i].put((fn, a, done))
            out, err = [None] * len(args), None
            for _ in args:
                i, value, e = done.get()
                out[i] = value
                err = err or e
        if err is not None:
            raise err
        return out


_POOLS: dict[int, _ShardPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> _ShardPool:
    with _POOLS_LOCK:
        pool = _POOLS.get(n)
        if pool is None or pool.pid != os.getpid():   # a forked child has no workers
            pool = _POOLS[n] = _ShardPool(n)
        return pool


def shard_count(x: torch.Tensor, threads: int | None = None) -> int:
    """How many slices a batch x is split into: torch's thread count on the CPU (threads=None),
    1 on GPUs, inside a worker, or when the slices would be smaller than MIN_SHARD samples."""
    if threads is None:
        threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    for pool in list(_POOLS.values()):
        if threading.get_ident() in pool.idents:
            return 1                                   # already on a worker: no nesting
    return max(1, min(int(threads), x.shape[0] // MIN_SHARD))


def shard_slices(n: int, shards: int) -> list[slice]:
    """`shards` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = [n * i // shards for i in range(shards + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def chunk_size(x: torch.Tensor) -> int | None:
    """The most samples of x a CPU worker handles at a time (CHUNK_PIXELS / (H * W), at least
    MIN_SHARD); None (no limit) off the CPU, where large batches are what keeps a GPU busy."""
    if x.device.type != "cpu":
        return None
    hw = x.shape[-2] * x.shape[-1] if x.dim() == 4 else 1
    return max(MIN_SHARD, CHUNK_PIXELS // max(hw, 1))


def sharded(fn, n: int, shards: int, chunk: int | None = None) -> list:
    """fn(slice) for contiguous slices covering range(n), in order: at least `shards` slices and
    none longer than `chunk` samples (when given). With shards > 1 each CPU worker thread (one
    intra-op thread each) takes a contiguous run of slices, one after another; with 1 they run
    inline. fn must treat samples independently and set any thread-local state it needs (grad
    mode, autocast) itself."""
    count = max(shards, -(-n // chunk)) if chunk else shards
    slices = shard_slices(n, max(1, min(count, n)))
    if shards <= 1:
        return [fn(s) for s in slices]
    runs = shard_slices(len(slices), shards)
    per_worker = _pool(shards).map(lambda run: [fn(s) for s in slices[run]], runs)
    return [r for rs in per_worker for r in rs]


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
    """Float stays float; a tensor becomes fp32 [N, 1, 1, 1] on x's device."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            return float(v)
        if v.shape != (x.shape[0],):
            raise ValueError(f"per-sample eps/alpha must have shape [{x.shape[0]}], got {list(v.shape)}")
        return v.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return float(v)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast for device's type at dtype, or a no-op context for dtype None (fp32).

    A fresh context per call: autocast state is per thread, so each worker of a split attack
    enters its own.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def uniform_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(-1, 1) noise of x's shape, drawn in contiguous NCHW order whatever x's layout.

    Drawing in one fixed order keeps the random start identical between a channels_last fast
    path and an NCHW reference; times eps it equals torch's uniform_(-eps, eps) bit for bit.
    """
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(-1.0, 1.0, generator=generator)


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


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, alpha, steps: int,
        random_start: bool = True, loss: str = "ce", kappa: float = 50.0, *,
        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
        amp: torch.dtype | None = None, threads: int | None = None) -> torch.Tensor:
    """Projected gradient ascent in the l_inf ball of radius eps around x.

    x [N, C, H, W] in [0, 1]; y [N] int64; eps, alpha: float or [N] (pixel units); steps >= 0.
    loss: "ce" (cross-entropy), "cw" (margin with kappa, as the authors' C&W), "kl" (TRADES:
    KL to the natural prediction, start x + 0.001 * N(0, 1) unclamped, as in TRADES).
    random_start ("ce"/"cw"): start at clamp(x + U(-eps, eps), 0, 1), as the authors' code.
    noise: optional start noise of x's shape (U(-1, 1) for ce/cw, N(0, 1) for kl) instead of
    drawing it from `generator` (or torch's global RNG). amp: None (fp32) or the autocast dtype
    of the model's forward (torch.bfloat16 / torch.float16); the objective, its input gradient
    and x_adv stay fp32. threads: on the CPU, the batch is split into this many parts attacked
    at once on single-threaded workers (None: torch.get_num_threads(); 1: one worker, the
    caller), each part in slices of at most chunk_size(x) samples. Samples are independent in
    eval mode and the start noise is drawn for the whole batch first, so the split does not
    change the result.
    Returns x_adv [N, C, H, W], detached, in x's memory layout.
    """
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; expected one of {ATTACK_LOSSES}")
    x = x.detach()
    # Draw the start for the whole batch here, on the caller's thread and generator, so the
    # random stream is the same however the batch is split below.
    if noise is None and loss == "kl":
        noise = torch.randn(x.shape, device=x.device, generator=generator)
    elif noise is None and random_start:
        noise = uniform_noise(x, generator)
    shards = shard_count(x, threads)
    e, a = _as_batch(eps, x), _as_batch(alpha, x)
    cut = lambda v, sl: v[sl] if isinstance(v, torch.Tensor) else v

    def attack(sl: slice) -> torch.Tensor:
        return _pgd_slice(model, x[sl], y[sl], cut(e, sl), cut(a, sl), steps, random_start, loss,
                          kappa, cut(noise, sl), amp)

    with eval_mode(model):
        parts = sharded(attack, x.shape[0], shards, chunk_size(x))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.contiguous(memory_format=_layout(x))


def _pgd_slice(model, x, y, e, a, steps, random_start, loss, kappa, noise, amp) -> torch.Tensor:
    """pgd on one slice of the batch, model already in eval mode; noise drawn by the caller.
    Runs on the thread it is called from, so grad mode and autocast are set here."""
    with torch.enable_grad():
        p_nat = None
        if loss == "kl":
            with torch.no_grad(), autocast(x.device, amp):
                p_nat = kernels.upcast(model(x))
            x_adv = (x + 0.001 * noise.to(x.dtype)).contiguous(memory_format=_layout(x))
        elif random_start:
            x_adv = x.clone()
            x_adv.add_(noise.to(x.dtype) * e).clamp_(0.0, 1.0)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast(x.device, amp):
                logits = model(x_adv)
            obj = _objective(loss, logits, y, kappa, p_nat)
            (grad,) = torch.autograd.grad(obj, x_adv)
            x_adv = x_adv.detach()
            kernels.pgd_step(x_adv, x, grad, a, e)
    return x_adv.detach()


def _layout(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


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
