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
allocation of modules, so a torch.compile'd attack on `folded` keeps its compiled graph. The
refresh runs once per training step, so its arithmetic is batched over all pairs in
torch._foreach ops (on CUDA about 10 kernel launches plus one per pair, where a pair at a time
made about 250 for ResNet18). `dtype` (the AMP dtype) stores the convs' and linear layers'
weights in it, so that autocast does not re-cast them at every forward of the attack.

`attack_copy(model)` is the copy the public attacks use: folded once per model and reused while
its weights are unchanged (checked exactly at every call)."""
from __future__ import annotations

import copy
import threading
import weakref

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
def _fold_into(convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d], weights: list[torch.Tensor],
               biases: list[torch.Tensor]) -> None:
    """weights[i], biases[i] <- (weight [O, I, kh, kw], bias [O]) of convs[i] followed by
    eval-mode bns[i], computed in fp32 or better and written into the given tensors (cast on the
    write, so they may be bf16/fp16).

    The same map as torch.nn.utils.fusion.fuse_conv_bn_weights, whose weight it equals bit for
    bit. Its bias is ((b - m) * rsqrt(v + eps)) * g + beta, which rounds differently in fp32 (up
    to an ulp) from (b - m) * (rsqrt(v + eps) * g) + beta here; an ulp in the attack copy's bias
    flips a gradient sign now and then and so moves every fp32 training run, so this keeps the
    association fastfat's numbers (and resumed runs trained before) were computed with. The
    float64 test pins both to the eval-mode model. Each step below is one torch._foreach op over
    all pairs, the same elementwise arithmetic as a pair at a time."""
    up = kernels.upcast
    scale = torch._foreach_add([up(bn.running_var) for bn in bns], [float(bn.eps) for bn in bns])
    torch._foreach_rsqrt_(scale)
    gamma = [(i, up(bn.weight)) for i, bn in enumerate(bns) if bn.weight is not None]
    if gamma:
        torch._foreach_mul_([scale[i] for i, _ in gamma], [g for _, g in gamma])
    shift = torch._foreach_neg([up(bn.running_mean) for bn in bns])
    conv_b = [(i, up(c.bias)) for i, c in enumerate(convs) if c.bias is not None]
    if conv_b:
        torch._foreach_add_([shift[i] for i, _ in conv_b], [b for _, b in conv_b])
    bias = torch._foreach_mul(shift, scale)
    beta = [(i, up(bn.bias)) for i, bn in enumerate(bns) if bn.bias is not None]
    if beta:
        torch._foreach_add_([bias[i] for i, _ in beta], [b for _, b in beta])
    torch._foreach_copy_(biases, bias)
    for conv, w, sc in zip(convs, weights, scale):   # one broadcast multiply per pair, into place
        torch.mul(up(conv.weight), sc.view(-1, 1, 1, 1), out=w)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by eval-mode bn, in conv's dtype (_fold_into of one pair)."""
    w = torch.empty_like(conv.weight)
    b = torch.empty(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    _fold_into([conv], [bn], [w], [b])
    return w, b


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def fold_bn(model: nn.Module, out: nn.Module | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Eval-only copy of `model` with every declared (conv, BN) pair merged into the conv.

    The copy shares no storage with `model`, is in eval mode and has requires_grad=False on all
    parameters (the attack only needs input gradients). With `out` (an earlier result of
    fold_bn on the same architecture) the folded weights are copied into it in place.
    dtype (the autocast dtype, for a copy that only runs under autocast): the convs' and linear
    layers' fp32 weights and biases are stored in it, rounded from the fold as autocast would
    round them at each forward (remaining BNs and float64 models stay as they are, as autocast
    leaves them); None keeps the model's dtype. Refreshing `out` keeps the dtypes it was made with."""
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
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device), requires_grad=False)
            _set_module(folded, b, nn.Identity())
        if dtype is not None:
            for m in folded.modules():   # autocast casts fp32 only (float64 runs stay float64)
                if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.dtype == torch.float32:
                    m.to(dtype)
        if pairs:   # none for a model that declares none (a user's): an eval-mode copy as it is
            _fold_into([mods[c] for c, _ in pairs], [mods[b] for _, b in pairs],
                       [folded.get_submodule(c).weight for c, _ in pairs],
                       [folded.get_submodule(c).bias for c, _ in pairs])
        return folded.eval().requires_grad_(False)

    # refresh in place: copy the unfolded tensors (one foreach copy, cast where the copy's dtype
    # differs), compute the folded ones into place
    out = _unwrap(out)
    folded_names = {f"{c}.weight" for c, _ in pairs} | {f"{c}.bias" for c, _ in pairs}
    src = dict(model.named_parameters())
    src.update(model.named_buffers())
    targets = list(out.named_parameters()) + list(out.named_buffers())
    stray = [n for n, _ in targets if n not in folded_names and n not in src]
    if stray:
        raise ValueError(f"`out` was not folded from this architecture (e.g. {stray[0]!r})")
    plain = [(t, src[name]) for name, t in targets if name not in folded_names]
    if plain:
        torch._foreach_copy_([t for t, _ in plain], [s for _, s in plain])
    if pairs:
        convs = [out.get_submodule(c) for c, _ in pairs]
        _fold_into([mods[c] for c, _ in pairs], [mods[b] for _, b in pairs],
                   [m.weight for m in convs], [m.bias for m in convs])
    return out.eval()


# ---------------------------------------------------------------------------------------------
# The public attacks' copy: folded once, reused while the weights stay the same

_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def foldable(model: nn.Module) -> bool:
    """Whether model declares (conv, BN) pairs and every declared BN is still there (a copy
    fold_bn made has Identity in their place: it is attacked as it is)."""
    if not hasattr(model, "_fold_pairs"):
        return False
    mods = dict(model.named_modules())
    pairs = model._fold_pairs()
    return bool(pairs) and all(isinstance(mods.get(b), nn.BatchNorm2d) for _, b in pairs)


def _unchanged(tensors: list[torch.Tensor], snapshot: list[torch.Tensor]) -> bool:
    """Exact equality of every tensor with its snapshot. On the CPU torch.equal per tensor; on a
    GPU the per-tensor results are gathered so that there is one host sync, not one per tensor."""
    if len(tensors) != len(snapshot) or any(t.shape != s.shape or t.dtype != s.dtype or t.device != s.device
                                            for t, s in zip(tensors, snapshot)):
        return False
    if not tensors:
        return True
    if tensors[0].device.type == "cpu":
        return all(torch.equal(t, s) for t, s in zip(tensors, snapshot))
    return not bool(torch.stack([(t != s).any() for t, s in zip(tensors, snapshot)]).any())


@torch.no_grad()
def attack_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The BN-folded, parameter-frozen copy of an eval-mode `model` for the public attacks
    (fastfat.attacks.pgd), made by fold_bn(model, dtype=dtype) once and reused while the model's
    weights are unchanged; `model` itself when there is nothing to fold (no declared pairs, or a
    copy fold_bn made) or it is torch.compile'd (its compiled graph is kept).

    "Unchanged" is checked exactly on every call: the parameters' and buffers' values against a
    snapshot taken at the last fold, plus the names and types of the modules. Tensor _version
    counters would be cheaper but miss writes through .data (p.data.mul_(2) bumps no counter) and
    checksums can collide; the comparison reads the weights twice, which is small beside an
    attack's forward and backward passes. A change refreshes the copy in place. The cache holds
    the model weakly (it goes with the model) and costs one copy of the weights besides the
    folded one."""
    if _unwrap(model) is not model or not foldable(model):
        return model
    state = list(model.named_parameters()) + list(model.named_buffers())
    tensors = [t.detach() for _, t in state]
    structure = ([n for n, _ in state], [(n, type(m)) for n, m in model.named_modules()])
    with _COPIES_LOCK:
        per_model = _COPIES.setdefault(model, {})
        entry = per_model.get(dtype)
        if entry is not None and entry["structure"] == structure:
            if _unchanged(tensors, entry["snapshot"]):
                return entry["copy"]
            if all(t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
                   for t, s in zip(tensors, entry["snapshot"])):
                fold_bn(model, out=entry["copy"])
                torch._foreach_copy_(entry["snapshot"], tensors)
                return entry["copy"]
        folded = fold_bn(model, dtype=dtype)
        per_model[dtype] = {"copy": folded, "structure": structure,
                            "snapshot": [t.clone() for t in tensors]}
        return folded
