"""BatchNorm folding for the attack's forward/backward passes.

During PGD the model is in eval mode, so a BN right after a conv is a fixed per-channel affine
map and can be merged into the conv (the map of torch.nn.utils.fusion.fuse_conv_bn_weights; see _folded):
w' = w * g / sqrt(v + eps), b' = beta + (b - m) * g / sqrt(v + eps). That removes one
memory-bound pass (forward and backward) per conv. Which convs are followed by which BN is
declared by each model's `_fold_pairs()`. The post-activation models (ResNet18/50, the CNN) fold
every BN. The pre-activation ones (PreActResNet18, WRN-34-10) fold each block's bn2 into its
conv1 (conv1 -> bn2 -> ReLU); each block's bn1 and the final BN pre-activate a residual sum and
stay (in eval mode): 9 of 17 BNs remain in PreActResNet18, 16 of 31 in WRN-34-10.

`fold_bn(model)` returns an eval-mode copy with its own storage and no parameter grads;
`fold_bn(model, out=folded)` refreshes an earlier copy in place after an optimizer step, with no
allocation of modules, so a torch.compile'd attack on `folded` keeps its compiled graph."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import kernels


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the model


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = model._fold_pairs() if hasattr(model, "_fold_pairs") else []
    mods = dict(model.named_modules())
    for c, b in pairs:
        conv, bn = mods.get(c), mods.get(b)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            raise ValueError(f"fold pair ({c}, {b}) is not (Conv2d, BatchNorm2d)")
        if bn.running_mean is None or conv.out_channels != bn.num_features:
            raise ValueError(f"cannot fold {b} into {c}")
    return pairs


@torch.no_grad()
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [O, I, kh, kw], bias [O]) of conv followed by eval-mode bn, computed in fp32 or
    better and returned in conv's dtype.

    The same map as torch.nn.utils.fusion.fuse_conv_bn_weights, whose weight it equals bit for
    bit. Its bias is ((b - m) * rsqrt(v + eps)) * g + beta, which rounds differently in fp32 (up
    to an ulp) from (b - m) * (rsqrt(v + eps) * g) + beta here; an ulp in the attack copy's bias
    flips a gradient sign now and then and so moves every fp32 training run, so this keeps the
    association fastfat's numbers (and resumed runs trained before) were computed with. The
    float64 test pins both to the eval-mode model."""
    up = kernels.upcast
    scale = up(bn.running_var).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * up(bn.weight)
    shift = -up(bn.running_mean)
    if conv.bias is not None:
        shift = shift + up(conv.bias)
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + up(bn.bias)
    weight = up(conv.weight) * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def fold_bn(model: nn.Module, out: nn.Module | None = None) -> nn.Module:
    """Eval-only copy of `model` with every declared (conv, BN) pair merged into the conv.

    The copy shares no storage with `model`, is in eval mode and has requires_grad=False on all
    parameters (the attack only needs input gradients). With `out` (an earlier result of
    fold_bn on the same architecture) the folded weights are copied into it in place."""
    model = _unwrap(model)
    pairs = _pairs(model)
    mods = dict(model.named_modules())
    if out is None:
        # deepcopy only the module skeleton: the memo hands it fresh detached tensors, so no
        # .grad, hooks on tensors, or autograd history are copied
        memo = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for b in model.buffers():
            memo[id(b)] = b.detach().clone()
        folded = copy.deepcopy(model, memo)
        for c, b in pairs:
            conv = folded.get_submodule(c)
            w, bias = _folded(mods[c], mods[b])
            conv.weight = nn.Parameter(w, requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            _set_module(folded, b, nn.Identity())
        return folded.eval().requires_grad_(False)

    # refresh in place: copy the unfolded tensors, recompute the folded ones
    out = _unwrap(out)
    folded_names = {f"{c}.weight" for c, _ in pairs} | {f"{c}.bias" for c, _ in pairs}
    src = dict(model.named_parameters())
    src.update(model.named_buffers())
    targets = list(out.named_parameters()) + list(out.named_buffers())
    stray = [n for n, _ in targets if n not in folded_names and n not in src]
    if stray:
        raise ValueError(f"`out` was not folded from this architecture (e.g. {stray[0]!r})")
    for name, t in targets:
        if name not in folded_names:
            t.copy_(src[name])
    for c, b in pairs:
        w, bias = _folded(mods[c], mods[b])
        conv = out.get_submodule(c)
        conv.weight.copy_(w)
        conv.bias.copy_(bias)
    return out.eval()
