"""fastfat's standard AutoAttack: APGD-CE, APGD-T, FAB-T and Square, each on the samples every
earlier attack left robust, every eps_test of a batch in one working batch; and its settings."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import apgd, pyaa
from .common import Logits, Rng, channels_last_on_cpu, input_grads_only, view_rows

from ..config import AA_IMPLS as IMPLS


def settings(attack: str, num_classes: int, impl: str = "fastfat", **overrides) -> dict:
    """The settings of `attack` ("aa" | "apgd") as eval.json records them: the implementation
    (fastfat | pyautoattack), the attacks in order and their parameters (pyaa.settings: the
    standard version's; n_target_classes capped at num_classes - 1). overrides: n_iter,
    square_n_queries (tests only)."""
    s = pyaa.settings(attack, num_classes, **overrides)
    if impl == "fastfat":
        from .. import __version__
        s.update(implementation="fastfat", package="fastfat", version=__version__,
                 spec=f"pyautoattack {pyaa.VERSION}")
    elif impl != "pyautoattack":
        raise ValueError(f"unknown AutoAttack implementation {impl!r}; expected one of {IMPLS}")
    return s


def _attack_fn(name: str):
    if name == "apgd-ce":
        return apgd.apgd_ce
    if name == "apgd-t":
        return apgd.apgd_t
    if name == "fab-t":
        from .fab import fab_t
        return fab_t
    from .square import square
    return square


def _kwargs(name: str, s: dict) -> dict:
    if name == "apgd-ce":
        return dict(n_iter=s["n_iter"], rho=s["rho"])
    if name == "apgd-t":
        return dict(n_iter=s["n_iter"], rho=s["rho"], n_target_classes=s["n_target_classes"])
    if name == "fab-t":
        return dict(n_iter=s["n_iter"], n_target_classes=s["n_target_classes"])
    return dict(n_queries=s["square_n_queries"], p_init=s["square_p_init"])


def run_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps_list, seeds,
              num_classes: int, *, amp: torch.dtype | None = None, threads: int | None = None,
              after_apgd: tuple | None = None, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """`attack` ("aa" | "apgd") on one batch at every radius of eps_list at once.

    x [n, C, H, W] in [0, 1]; y [n] int64; eps_list: E radii (pixel units); seeds: E ints, the
    (batch, eps) cells' eval_noise_seed(seed, batch, "aa", e) (every attack starts its
    generators from them afresh, as pyautoattack reseeds before each attack: common.Rng). The model must be in eval mode; only input gradients
    are taken. threads: CPU shard workers (None: torch's thread count). Returns (x_adv [E*n, C,
    H, W], pred [E*n] int64), eps-major: row e*n + i is sample i at eps_list[e]; pred == y iff
    the sample was classified correctly and no attack fooled it. after_apgd: the result of
    `apgd` on the same batch, radii, seeds and settings; `aa` then goes on from it with FAB-T and
    Square (its first two attacks would repeat that run exactly)."""
    s = settings(attack, num_classes, "fastfat", **overrides)
    with channels_last_on_cpu(model, x):
        return _run(model, x, y, s, eps_list, seeds, amp, threads, after_apgd)


def _run(model, x, y, s, eps_list, seeds, amp, threads, after_apgd):
    logits_fn = Logits(model, amp, threads, keep_float64=True)
    x = x.detach().to(logits_fn.out_dtype)
    n, E = x.shape[0], len(eps_list)
    group = torch.arange(E, device=x.device).repeat_interleave(n)
    pos = torch.arange(n, device=x.device).repeat(E)
    eps = torch.tensor([float(e) for e in eps_list], dtype=torch.float64, device=x.device)[group].to(x.dtype)
    with input_grads_only(model), torch.no_grad():
        x_rep, y_rep = x[pos], y[pos]
        attacks = s["attacks"]
        if after_apgd is None:
            pred = logits_fn(x).argmax(1)[pos]
            x_adv = x_rep.clone()
        else:
            x_adv, pred = after_apgd[0].to(x.dtype).clone(), after_apgd[1].clone()
            attacks = [a for a in attacks if a not in ("apgd-ce", "apgd-t")]
        for name in attacks:
            idx = (pred == y_rep).nonzero()[:, 0]   # one host sync per attack, outside its loop
            if idx.numel() == 0:
                break
            rng = Rng(seeds, group[idx], pos[idx], n, x.device)   # reseeded per attack, as pyautoattack
            adv = _attack_fn(name)(logits_fn, x_rep[idx], y_rep[idx], eps[idx], rng=rng, **_kwargs(name, s))
            p = logits_fn(adv).argmax(1)            # the verdict on the example itself, as pyautoattack's
            fooled = p != y_rep[idx]
            x_adv[idx] = torch.where(view_rows(fooled, adv), adv.to(x_adv.dtype), x_adv[idx])
            pred[idx] = torch.where(fooled, p, pred[idx])
    return x_adv, pred


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, seed: int,
        num_classes: int, *, amp: torch.dtype | None = None, threads: int | None = None,
        impl: str = "fastfat", **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """`attack` ("aa" | "apgd") on one batch at radius eps with implementation impl ("fastfat" |
    "pyautoattack"): (x_adv [N, C, H, W], pred [N] int64), robust iff pred == y. seed: the cell's
    eval_noise_seed(seed, batch, "aa", eps index). See run_batch and pyaa.run."""
    if impl == "pyautoattack":
        return pyaa.run(model, x, y, attack, eps, seed, num_classes, amp=amp, threads=threads, **overrides)
    if impl != "fastfat":
        raise ValueError(f"unknown AutoAttack implementation {impl!r}; expected one of {IMPLS}")
    return run_batch(model, x, y, attack, [eps], [seed], num_classes, amp=amp, threads=threads, **overrides)
