"""Weights trained elsewhere: a state_dict file (or a dict holding one under state_dict, model,
model_state_dict or net; DataParallel/DDP's `module.` prefix stripped), loaded with
weights_only=True and checked key by key and shape by shape against the model before use."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import UserError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIX = "module."


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in d.items())


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (see the module docstring); UserError if it holds none."""
    if not os.path.isfile(path):
        raise UserError(f"--weights {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a pickle of other objects, a truncated file, not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--weights {path}: cannot be read as tensors (weights_only): {first}") from None
    if not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and _is_state_dict(obj.get(k))), None)
        if inner is None:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"--weights {path}: no state_dict in it (nor under {', '.join(WRAPPER_KEYS)}); "
                            f"found {keys}")
        obj = inner
    if all(k.startswith(PREFIX) for k in obj):
        obj = {k[len(PREFIX):]: v for k, v in obj.items()}
    return obj


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """model with the weights of `path` loaded; UserError naming the missing and unexpected keys
    or the tensors whose shapes differ."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise UserError(f"--weights {path} does not fit the model: {'; '.join(parts)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(v.shape)}" for k, v in own.items()
              if state[k].shape != v.shape]
    if shapes:
        raise UserError(f"--weights {path} does not fit the model: {'; '.join(shapes[:4])}")
    model.load_state_dict(state)
    return model
