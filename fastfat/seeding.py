"""The random-stream contract shared by the fast path and the reference: which generator, seeded
how, draws each random number of a run, so that resuming, splitting and re-batching replay it.

- data order and augmentation: epoch_generator(seed, epoch, device, "data");
- training attack start noise: epoch_generator(seed, epoch, device, "attack"), batch after batch;
- per-sample torchvision transforms: sample_seed(epoch_seed, i);
- evaluation start noise for (batch b, attack a, eps index e): a fresh generator seeded with
  eval_noise_seed(seed, b, a, e); AutoAttack's (batch, eps) cell is seeded with
  eval_noise_seed(seed, b, "aa", e) for both `aa` and `apgd`, so `apgd` runs exactly the first two
  attacks of `aa`: pyautoattack (--aa-impl pyautoattack) reseeds torch's global generator with it
  (inside torch.random.fork_rng), fastfat's implementation starts fresh generators from it for
  every attack (fastfat.autoattack.common.Rng), APGD drawing pyautoattack's very numbers.
"""
from __future__ import annotations

import re

import torch

# Multiplier that spreads a run seed over the integers so that (seed, epoch) and (seed, index)
# pairs do not collide for any epoch or index below it.
SEED_SCALE = 1_000_003
STREAMS = {"data": 0, "attack": 1}


def epoch_generator(seed: int, epoch: int, device, stream: str = "data") -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, stream): resuming at epoch k
    replays it. stream "data" orders and augments the batches; "attack" draws the training
    attack's start noise, so the two never reuse each other's random numbers."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * SEED_SCALE + epoch) * 2 + STREAMS[stream])
    return g


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of sample `index`'s own random transforms in an epoch seeded with epoch_seed."""
    return epoch_seed * SEED_SCALE + index


def scaled_seed(seed: int) -> int:
    """A run seed spread by SEED_SCALE, for libraries that add the epoch themselves (FFCV)."""
    return seed * SEED_SCALE


_ATTACK_CODES = {"clean": 0, "fgsm": 1, "cw": 2, "aa": 3}
_PGD_CODE_BASE = 16          # pgdK -> 16 + K
_MAX_CODE = 1 << 20          # attack codes stay below this
_MAX_EPS_INDEX = 1 << 10
_SEED_MASK = (1 << 63) - 1   # torch.Generator.manual_seed takes 64-bit values; stay positive


def attack_code(name: str) -> int:
    """A fixed integer per attack name: clean 0, fgsm 1, cw 2, aa 3 (AutoAttack), pgdK 16 + K."""
    if name in _ATTACK_CODES:
        return _ATTACK_CODES[name]
    m = re.fullmatch(r"pgd(\d+)", name)
    if m and 1 <= int(m.group(1)) < _MAX_CODE - _PGD_CODE_BASE:
        return _PGD_CODE_BASE + int(m.group(1))
    raise ValueError(f"unknown attack {name!r}; expected clean, fgsm, cw, aa or pgdK")


def eval_noise_seed(seed: int, batch_index: int, attack_name: str, eps_index: int) -> int:
    """The seed of the start noise for one (batch, attack, eps) cell of an evaluation.

    Plain integer arithmetic (no hash(), which Python salts per process), so the reference
    and the fast evaluation draw identical starts whatever order they visit the cells in:
    seed -> batch -> attack code -> eps index, each level in its own radix, masked to 63 bits.
    """
    for name, v in (("seed", seed), ("batch_index", batch_index), ("eps_index", eps_index)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if eps_index >= _MAX_EPS_INDEX:
        raise ValueError(f"eps_index must be < {_MAX_EPS_INDEX}, got {eps_index}")
    code = attack_code(attack_name)
    s = (seed * SEED_SCALE + batch_index) & _SEED_MASK
    s = (s * _MAX_CODE + code) & _SEED_MASK
    s = (s * _MAX_EPS_INDEX + eps_index) & _SEED_MASK
    return s


