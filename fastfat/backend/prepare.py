"""A model fastfat did not build, made ready to attack: its inputs, labels and outputs checked,
a BatchNorm-folded copy where its layers allow one, eval mode, and its state restored after.

Any nn.Module taking [N, C, H, W] images in [0, 1] and returning logits [N, num_classes] is
accepted. Folding: a fastfat model (it declares its (conv, BN) pairs) through
fastfat.models.fold; any other model through torch.fx's conv/BN fusion when it traces, kept only
if its logits equal the model's to fp32 rounding on the first batch; else the model as given.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from ..errors import UserError
from ..metrics import check_finite_logits
from ..models.fold import foldable, fold_bn


def check_eps(eps) -> float:
    """eps as a float in (0, 1] (pixel units), else UserError (a ValueError)."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"eps must be a number in (0, 1] (pixel units, e.g. 8/255), got {eps!r}") from None
    if not 0.0 < e <= 1.0:
        raise UserError(f"eps must be in (0, 1] (pixel units, e.g. 8/255), got {eps!r}")
    return e


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """x [N, C, H, W] floating in [0, 1], y [N] integer labels, else UserError."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError("x and y must be torch tensors (images [N, C, H, W] in [0, 1], labels [N])")
    if not x.is_floating_point() or x.dim() < 2:
        raise UserError(f"x must be a floating-point batch [N, C, H, W], got {tuple(x.shape)} {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"y must be integer labels [N] with N = {x.shape[0]}, got {tuple(y.shape)} {y.dtype}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise UserError(f"x must be in [0, 1] (normalization belongs inside the model), got values in "
                        f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")


def check_logits(logits, n: int) -> int:
    """The class count of a model's output on n samples: it must be a finite [n, C] tensor."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model must return logits [N, num_classes] = [{n}, C]; it returned {shape}")
    check_finite_logits(logits, "the given samples")
    return int(logits.shape[1])


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes), else UserError."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"labels must be in [0, {num_classes}) (the model has {num_classes} outputs), "
                        f"got values in [{int(y.min())}, {int(y.max())}]")


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> int:
    """Check x, y and the eval-mode model's output on a few samples; the class count (from the
    output; num_classes, when given, must equal it). UserError for any misfit."""
    check_inputs(x, y)
    with torch.no_grad():
        try:
            logits = model(x[:8])
        except Exception as e:   # the user's forward on the user's data: say what failed
            raise UserError(f"the model failed on inputs {tuple(x[:8].shape)}: {type(e).__name__}: {e}") from None
    c = check_logits(logits, min(8, x.shape[0]))
    if num_classes is not None and num_classes != c:
        raise UserError(f"num_classes is {num_classes} but the model returns {c} logits")
    check_labels(y, c)
    return c


def _fx_folded(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """torch.fx's conv/BN fusion of an eval-mode copy, or None when the model does not trace or
    the copy's logits on x differ from the model's beyond fp32 rounding."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    try:
        from torch.fx.experimental.optimization import fuse
        folded = fuse(copy.deepcopy(model).eval()).requires_grad_(False)
        with torch.no_grad():
            a, b = model(x), folded(x)
        scale = float(a.abs().max()) + 1.0
        return folded if torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale) else None
    except Exception:   # not traceable (data-dependent control flow, ...): attacked as given
        return None


@contextlib.contextmanager
def attackable(model: nn.Module, x_probe: torch.Tensor, fold: bool = True):
    """Yields (the model to attack, how: "fastfat fold" | "fx fold" | "as given"): a BN-folded
    copy when possible, else `model` itself in eval mode. On exit every module's train/eval mode,
    every parameter's requires_grad and .grad are as they were."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        attacked, how = model, "as given"
        if fold and foldable(model):
            attacked, how = fold_bn(model), "fastfat fold"
        elif fold:
            f = _fx_folded(model, x_probe)
            if f is not None:
                attacked, how = f, "fx fold"
        yield attacked, how
    finally:
        for m, t in modes:
            m.training = t
        for p, g, r in grads:
            p.requires_grad_(r)
            p.grad = g
