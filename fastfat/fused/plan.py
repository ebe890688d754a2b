"""Which grid points train together: plan_groups (compatible points, K at a time, in grid order)
and auto_k (how many members fit: K from one member's measured peak memory on CUDA)."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..runtime import resolve_device
from .train import fuse_key

MAX_AUTO_K = 16
# On the CPU fusion does not pay (bench.fused, bench/README.md): a step is bound by convolution
# arithmetic, which fusion does not reduce, and oneDNN's grouped convolutions with 16-32
# channels per group are 1.4-2.3x slower per member than the dense ones (ResNet18 width 16:
# fused K=4 at 0.72x); the demo CNN gains about 1.1x. So "auto" does not fuse there.
CPU_AUTO_K = 1
# The share of free GPU memory the K members' measured peak may fill (the rest: the allocator's
# fragmentation, cuDNN workspaces, the evaluation that follows).
GPU_MEMORY_SHARE = 0.7


def plan_groups(cfgs: list[TrainConfig], fuse: int | str = 1) -> list[list[int]]:
    """Indices of cfgs in fused groups: points with equal fuse_key, in grid order, at most K per
    group (fuse: an int >= 1, or "auto": auto_k of each key's first point). fuse=1 gives one
    group per point, as an unfused sweep. Every index appears once."""
    if fuse != "auto" and (isinstance(fuse, bool) or not isinstance(fuse, int) or fuse < 1):
        raise UserError(f"fuse must be a positive integer or \"auto\", got {fuse!r}")
    by_key: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        by_key.setdefault(fuse_key(c), []).append(i)
    groups = []
    for idx in by_key.values():
        k = auto_k(cfgs[idx[0]]) if fuse == "auto" else fuse
        if k > 1 and not user_model_fuses(cfgs[idx[0]]):
            k = 1
        groups += [idx[j:j + k] for j in range(0, len(idx), k)]
    return sorted(groups, key=lambda g: g[0])


_FUSES: dict[tuple, bool] = {}


def user_model_fuses(cfg: TrainConfig) -> bool:
    """Whether cfg's model fuses: fastfat's own always; a user model (--model FILE.py:Name) when two
    of them fuse and the fused forward equals each member's (checked once per model, width and
    data set on a random batch). A user model that does not is trained unfused, said once."""
    from ..models.user import is_spec
    if not is_spec(cfg.model):
        return True
    key = (cfg.model, cfg.width, cfg.dataset)
    if key not in _FUSES:
        _FUSES[key] = _trial_fuse(cfg)
        if not _FUSES[key]:
            import sys
            print(f"fastfat: note: model {cfg.model} does not fuse (only Conv2d, BatchNorm2d and Linear "
                  "layers, stacked per member, do); its points train unfused", file=sys.stderr)
    return _FUSES[key]


def _trial_fuse(cfg: TrainConfig) -> bool:
    from ..data import dataset_info
    from ..models import build_model
    from .model import fuse_models
    info = dataset_info(cfg.dataset)
    try:
        members = [build_model(cfg.model, info.num_classes, cfg.width, info.channels).eval() for _ in range(2)]
        fused = fuse_models(members).eval()
        x = torch.rand(2, info.channels, info.size, info.size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = fused.unstack(fused(fused.stack([x, x])))
            return all(torch.allclose(o, m(x), rtol=1e-4, atol=1e-5) for o, m in zip(out, members))
    except Exception:   # a layer fuse_models does not know, a forward the stacking breaks: unfused
        return False


def auto_k(cfg: TrainConfig, max_k: int = MAX_AUTO_K) -> int:
    """How many members of cfg's kind to fuse: on CUDA as many as fit GPU_MEMORY_SHARE of the
    free memory by one member's measured peak (a real training step at cfg's batch size), at
    most max_k; on the CPU, CPU_AUTO_K (1: no fusion)."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return min(CPU_AUTO_K, max_k)
    return min(max_k, max(1, int(GPU_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]
                                 // max(member_peak_bytes(cfg, device), 1))))


def member_peak_bytes(cfg: TrainConfig, device: torch.device) -> int:
    """Peak CUDA memory of one training step of one member (weights, optimizer state, the
    attack copy and the step's activations), measured on random data of the data set's shape."""
    from ..data import dataset_info
    from ..runfiles import build_for_config
    from ..train import Trainer
    info = dataset_info(cfg.dataset)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, build_for_config(cfg, device), device)
    x = torch.rand(cfg.batch_size, info.channels, info.size, info.size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, info.num_classes, (cfg.batch_size,), device=device)
    trainer.train_step(x, y)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del trainer, x, y
    torch.cuda.empty_cache()
    return int(peak)
