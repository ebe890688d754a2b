"""Horizontal fusion of K identical-architecture models into one (HFTA-style channel stacking),
and splitting it back.

Every Conv2d(C, O, groups=g) becomes Conv2d(K*C, K*O, groups=K*g), every BatchNorm2d(C) a
BatchNorm2d(K*C) and every Linear(I, O) a FusedLinear (K matrices in one batched matmul). The
fused network is the members' own class with those modules swapped, so its forward code runs
unchanged on [B, K*C, H, W]: member k owns channels k*C..(k+1)*C-1 of every activation, and the
ops between the swapped modules (ReLU, pooling, residual adds, flatten) act per channel. Every
fused tensor is the members' tensors concatenated along dim 0, so fusing and splitting weights,
BN running statistics and optimizer state are plain cat / chunk (exact copies).

Why channel stacking rather than torch.func.stack_module_state + vmap(functional_call): both
are exact (vmap turns a batched conv into a grouped one too, and updates stacked BN statistics
in place), but the channel-stacked model is an ordinary nn.Module of the members' class, so
everything that takes a model works on it as it is: fastfat.models.fold_bn and the cached attack
copy (a grouped conv followed by a BN over K*C channels folds per output channel, the same
arithmetic), the attacks (an nn.Module, input gradients, sharding, per-sample eps), eval_mode,
channels_last, torch.compile and the optimizer (plain parameters, one per member tensor kind).
vmap would need a functional twin of each of these.

FusedModel takes the K members' batches interleaved sample by sample: row n*K + k of its input
[N*K, C, H, W] is sample n of member k, and row n*K + k of its logits [N*K, classes] is member
k's prediction for it. Contiguous NCHW, that is exactly [N, K*C, H, W]; per-member radii become
per-sample radii, and the attacks keep each run of K rows in one slice (sample_group).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class FusedLinear(nn.Module):
    """K Linear(in_features, out_features) layers in one: [..., K*in] -> [..., K*out], member k
    reading inputs k*in..(k+1)*in-1. weight [K*out, in] and bias [K*out] are the members'
    weights and biases concatenated."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(k * out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(k * out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 1:       # one member: exactly nn.Linear's call
            return F.linear(x, self.weight, self.bias)
        lead, k, i, o = x.shape[:-1], self.k, self.in_features, self.out_features
        xs = x.reshape(-1, k, i).transpose(0, 1)                  # [K, N, in]
        w = self.weight.view(k, o, i).transpose(1, 2)              # [K, in, out]
        out = torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias.view(k, 1, o), xs, w)
        return out.transpose(0, 1).reshape(*lead, k * o)

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


def _fused_module(m: nn.Module, k: int) -> nn.Module:
    """An empty K-fold twin of one member's leaf module (its tensors are loaded afterwards)."""
    t = next(t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
             if t.is_floating_point())
    kw = dict(device=t.device, dtype=t.dtype)
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, m.stride, m.padding,
                         m.dilation, k * m.groups, m.bias is not None, m.padding_mode, **kw)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(k * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                              **kw)
    if isinstance(m, nn.Linear):
        return FusedLinear(k, m.in_features, m.out_features, m.bias is not None, **kw)
    raise ValueError(f"cannot fuse {type(m).__name__} modules (only Conv2d, BatchNorm2d and "
                     f"Linear hold tensors in a fusable model)")


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def _check_same_architecture(models: list[nn.Module]) -> None:
    ref = [(n, type(m), m.extra_repr()) for n, m in models[0].named_modules()]
    ref_shapes = {n: (t.shape, t.dtype, t.device) for n, t in models[0].state_dict().items()}
    for i, m in enumerate(models[1:], 1):
        if [(n, type(s), s.extra_repr()) for n, s in m.named_modules()] != ref or \
                {n: (t.shape, t.dtype, t.device) for n, t in m.state_dict().items()} != ref_shapes:
            raise ValueError(f"model {i} does not have model 0's architecture (modules, shapes, "
                             f"dtypes and devices must agree)")


class FusedModel(nn.Module):
    """K models of one architecture trained as one (see the module docstring).

    forward: x [N*K, C, H, W], row n*K + k = sample n of member k (contiguous NCHW; see stack)
    -> logits [N*K, classes] in the same order. `net` is the channel-stacked network; k and
    sample_group (= k, read by fastfat.attacks.pgd) say how many members it holds.
    """

    def __init__(self, net: nn.Module, k: int, template: nn.Module, channels_last: bool,
                 counter_offsets: dict[str, list[int]]):
        super().__init__()
        self.net, self.k, self.sample_group = net, k, k
        self.channels_last = channels_last
        # One member's skeleton on the meta device (not a submodule: no parameters), to split into.
        object.__setattr__(self, "_template", template)
        # Integer buffers (BN's num_batches_tracked) hold one value for all members; each
        # member's own count is the fused count plus its offset here.
        self._counter_offsets = counter_offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // self.k
        z = x.contiguous().view(n, self.k * x.shape[1], *x.shape[2:])
        if self.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        out = self.net(z)
        return out.view(n * self.k, out.shape[1] // self.k)

    def _fold_pairs(self) -> list[tuple[str, str]]:
        """The members' (conv, BN) pairs, for fastfat.models.fold_bn."""
        return [(f"net.{c}", f"net.{b}") for c, b in self.net._fold_pairs()] \
            if hasattr(self.net, "_fold_pairs") else []

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """K per-member tensors [N, ...] -> [N*K, ...] interleaved (row n*K + k = tensors[k][n]),
        contiguous: batches, labels, per-sample radii or start noise."""
        if len(tensors) != self.k:
            raise ValueError(f"expected {self.k} tensors, one per member, got {len(tensors)}")
        # torch.stack keeps its inputs' layout; a channels_last batch of one channel (digits) is
        # "contiguous" in both layouts, and its stack is not viewable as [N*K, ...] without a copy
        t = torch.stack([t.contiguous() for t in tensors], dim=1).contiguous()
        return t.view(t.shape[0] * self.k, *t.shape[2:])

    def unstack(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of stack: [N*K, ...] -> K views [N, ...] (member k's rows)."""
        return list(t.view(t.shape[0] // self.k, self.k, *t.shape[1:]).unbind(1))


def fuse_state_dicts(states: list[dict]) -> tuple[dict, dict[str, list[int]]]:
    """K members' state dicts -> (the fused state dict, integer-counter offsets per key): every
    tensor concatenated along dim 0; 0-dim tensors (BN's num_batches_tracked) take member 0's
    value, each member's difference kept as its offset."""
    fused, offsets = {}, {}
    for key, t0 in states[0].items():
        ts = [s[key] for s in states]
        if t0.dim() == 0:
            fused[key] = t0.clone()
            offsets[key] = [int(t - t0) for t in ts]
        else:
            fused[key] = torch.cat(ts, 0)
    return fused, offsets


def split_state_dict(fused: dict, k: int, offsets: dict[str, list[int]] | None = None) -> list[dict]:
    """Inverse of fuse_state_dicts: K member state dicts (clones, in the fused tensors' layout)."""
    offsets = offsets or {}
    out = [{} for _ in range(k)]
    for key, t in fused.items():
        if t.dim() == 0:
            for i in range(k):
                out[i][key] = t.clone() + offsets.get(key, [0] * k)[i]
        else:
            for i, part in enumerate(t.chunk(k, 0)):
                out[i][key] = part.clone()
    return out


def fuse_models(models: list[nn.Module]) -> FusedModel:
    """One FusedModel holding copies of K models of the same architecture (same class, module
    tree, shapes, dtype and device), in model 0's mode and memory format. The models are not
    modified; fused and split back (split_models) they are bit-identical copies.

    Every tensor-holding module must be a Conv2d, BatchNorm2d or Linear (all fastfat models are),
    and forward must act per channel elsewhere (activations, pooling, residual sums, flatten).

    Example, three variants trained at once by plain adversarial-training code::

        fused = fastfat.fuse_models([m1, m2, m3])            # K = 3
        opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
        x, y = fused.stack([x1, x2, x3]), fused.stack([y1, y2, y3])   # [3B, C, H, W], [3B]
        eps = fused.stack([torch.full((B,), e) for e in (2/255, 4/255, 8/255)])
        x_adv = fastfat.pgd(fused, x, y, eps, eps / 4, 10)   # each member attacked alone
        fused.train()
        logits = fused.unstack(fused(x_adv))                  # 3 x [B, classes]
        loss = sum(F.cross_entropy(z, yk) for z, yk in zip(logits, (y1, y2, y3)))
        opt.zero_grad(); loss.backward(); opt.step()          # = 3 separate SGD steps
        m1, m2, m3 = fastfat.split_models(fused)
    """
    models = [getattr(m, "_orig_mod", m) for m in models]
    if not models:
        raise ValueError("fuse_models needs at least one model")
    _check_same_architecture(models)
    k = len(models)
    for name, m in models[0].named_modules():
        if isinstance(m, nn.BatchNorm2d) and m.momentum is None and m.track_running_stats and \
                len({int(mm.get_submodule(name).num_batches_tracked) for mm in models}) > 1:
            raise ValueError("BatchNorm with momentum=None (cumulative averages) needs equal "
                             "num_batches_tracked in every member")
    # The skeleton: model 0's module tree with each tensor-holding leaf swapped for its K-fold twin.
    net = copy.deepcopy(models[0])
    for name, m in list(net.named_modules()):
        if not (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
            continue
        if list(m.children()):
            raise ValueError(f"cannot fuse {name}: a module with both its own tensors and children")
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, _fused_module(m, k))
    state, offsets = fuse_state_dicts([m.state_dict() for m in models])
    cl = _is_channels_last(models[0])
    if cl:
        net = net.to(memory_format=torch.channels_last)
    net.load_state_dict(state)
    template = copy.deepcopy(models[0]).to("meta")
    return FusedModel(net, k, template, cl, offsets).train(models[0].training)


def split_models(fused: FusedModel) -> list[nn.Module]:
    """The K member models of a FusedModel: fresh modules of the members' class with their own
    copies of the current weights and buffers, in the fused model's mode, device and memory
    format."""
    fused = getattr(fused, "_orig_mod", fused)
    states = split_state_dict(fused.net.state_dict(), fused.k, fused._counter_offsets)
    p = next(fused.net.parameters())
    out = []
    for s in states:
        m = copy.deepcopy(fused._template).to_empty(device=p.device).to(p.dtype)
        if fused.channels_last:
            m = m.to(memory_format=torch.channels_last)
        m.load_state_dict(s)
        out.append(m.train(fused.training))
    return out
