"""Model zoo: `build_model(name, num_classes, width, in_channels)`.

All models take [B, in_channels, H, W] images in [0, 1] (no normalization inside, like the FAT
authors' code) and return logits [B, num_classes]; pooling is adaptive, so 8x8 digits, one-channel
28x28 (Fashion-)MNIST and three-channel 96x96 STL-10 go through the same networks. Every model
keeps its CIFAR stem (a 3x3 stride-1 conv, no max-pool) at every size, as DAFA's STL-10 runs
do with their CIFAR ResNet (they resize STL-10 to 64x64 first; fastfat trains on the 96x96
pixels, so a 96x96 step costs about 9x a 32x32 one). `width` is each family's base channel
count (None -> the paper's size)."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .cnn import cnn
from .fold import fold_bn
from .preact_resnet import preactresnet18
from .resnet import resnet18, resnet50
from .user import build_user_model, canonical_spec, is_spec
from .wideresnet import wrn32_10

# canonical name -> (constructor, default width)
_BUILDERS = {
    "resnet18": (resnet18, 64),
    "resnet50": (resnet50, 64),
    "wrn-32-10": (wrn32_10, 160),
    "preactresnet18": (preactresnet18, 64),
    "cnn": (cnn, 32),
}
MODEL_NAMES = tuple(_BUILDERS)
# the paper's "WRN-32-10" is the TRADES WRN-34-10 (32 weight layers + 2 shortcut convs)
ALIASES = {
    "wrn-34-10": "wrn-32-10",
    "wrn32-10": "wrn-32-10",
    "wrn34-10": "wrn-32-10",
    "preact-resnet18": "preactresnet18",
}

__all__ = ["ALIASES", "MODEL_NAMES", "build_model", "canonical_model_name", "fold_bn"]


def canonical_model_name(name: str) -> str:
    """'WRN-34-10' -> 'wrn-32-10'; a user model's FILE.py:Name or package.module:Name checked and
    kept (its file made absolute: fastfat.models.user); raises UserError listing the valid names."""
    if is_spec(name):
        return canonical_spec(name)
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in _BUILDERS:
        choices = ", ".join(MODEL_NAMES + tuple(ALIASES))
        raise UserError(f"unknown model {name!r}; choose one of: {choices}, or FILE.py:Name")
    return key


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model {what} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, num_classes: int, width: int | None = None,
                in_channels: int = 3) -> nn.Module:
    """A freshly initialised model in train mode on the CPU (a user model: as its code makes it)."""
    if is_spec(name):
        width = None if width is None else _positive_int("width", width)
        return build_user_model(name, _positive_int("num_classes", num_classes),
                                _positive_int("in_channels", in_channels), width).train()
    builder, default_width = _BUILDERS[canonical_model_name(name)]
    width = default_width if width is None else _positive_int("width", width)
    return builder(num_classes=_positive_int("num_classes", num_classes), width=width,
                   in_channels=_positive_int("in_channels", in_channels))
