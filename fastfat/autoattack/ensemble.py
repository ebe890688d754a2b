"""fastfat's AutoAttack ensemble: its sub-attacks (APGD-CE, APGD-T, FAB-T, Square) in order, each on
the samples every earlier attack left robust, every eps_test of a batch in one working batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import apgd, pyaa
from .common import Logits, Rng, channels_last_on_cpu, input_grads_only, view_rows
from .standard import IMPLS, settings

SUB_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
CLEAN, ROBUST = -2, -1   # fooled_by codes besides a plan index: clean-misclassified, still robust


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


def plan_of(s: dict) -> list[tuple[str, dict, int]]:
    """The ensemble of settings s (standard.parameters' form) as run_plan takes it: per sub-attack
    in order, (name, its keyword settings, restarts)."""
    kw = {"apgd-ce": dict(n_iter=s["n_iter"], rho=s["rho"]),
          "apgd-t": dict(n_iter=s["n_iter"], rho=s["rho"], n_target_classes=s["n_target_classes"]),
          "fab-t": dict(n_iter=s["n_iter"], n_target_classes=s["n_target_classes"]),
          "square": dict(n_queries=s.get("square_n_queries"), p_init=s.get("square_p_init"))}
    restarts = {"apgd-ce": s["apgd_ce_restarts"], "apgd-t": s["apgd_t_restarts"]}
    return [(name, kw[name], restarts.get(name, 1)) for name in s["attacks"]]


def run_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps_list, seeds,
              num_classes: int, *, amp: torch.dtype | None = None, threads: int | None = None,
              after_apgd: tuple | None = None, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """`attack` ("aa" | "apgd") on one batch at every radius of eps_list at once.

    x [n, C, H, W] in [0, 1]; y [n] int64; eps_list: E radii (pixel units); seeds: E ints, the
    (batch, eps) cells' eval_noise_seed(seed, batch, "aa", e) (every attack starts its
    generators from them afresh, as pyautoattack reseeds before each attack: common.Rng). The
    model must be in eval mode; only input gradients are taken. threads: CPU shard workers
    (None: torch's thread count). Returns (x_adv [E*n, C, H, W], pred [E*n] int64), eps-major:
    row e*n + i is sample i at eps_list[e]; pred == y iff the sample was classified correctly and
    no attack fooled it. after_apgd: the result of `apgd` on the same batch, radii, seeds and
    settings; `aa` then goes on from it with FAB-T and Square (its first two attacks would
    repeat that run exactly)."""
    plan = plan_of(settings(attack, num_classes, "fastfat", **overrides))
    start = None
    if after_apgd is not None:
        plan = [p for p in plan if p[0] not in ("apgd-ce", "apgd-t")]
        start = tuple(after_apgd[:2])
    x_adv, pred, _ = run_plan(model, x, y, plan, eps_list, seeds, amp=amp, threads=threads, start=start)
    return x_adv, pred


def run_plan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan, eps_list, seeds, *,
             amp: torch.dtype | None = None, threads: int | None = None,
             start: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sub-attacks of plan ([(name, settings, restarts)], names from SUB_ATTACKS) in order on
    one batch at every radius of eps_list, each on the rows every earlier one left robust (a
    restart on the rows its earlier restarts left robust, its random numbers going on from
    theirs, as pyautoattack's). x, y, eps_list, seeds, amp, threads as run_batch's; start: (x_adv,
    pred) of an earlier run to go on from. Returns (x_adv, pred, fooled_by), [E*n] rows
    eps-major; fooled_by int64: the plan index of the attack that fooled the row, CLEAN for a
    clean misclassification, ROBUST where none did (unknown rows of `start` count as CLEAN)."""
    with channels_last_on_cpu(model, x):
        return _run(model, x, y, plan, eps_list, seeds, amp, threads, start)


def _run(model, x, y, plan, eps_list, seeds, amp, threads, start):
    logits_fn = Logits(model, amp, threads, keep_float64=True)
    x = x.detach().to(logits_fn.out_dtype)
    n, E = x.shape[0], len(eps_list)
    group = torch.arange(E, device=x.device).repeat_interleave(n)
    pos = torch.arange(n, device=x.device).repeat(E)
    eps = torch.tensor([float(e) for e in eps_list], dtype=torch.float64, device=x.device)[group].to(x.dtype)
    with input_grads_only(model), torch.no_grad():
        x_rep, y_rep = x[pos], y[pos]
        if start is None:
            pred = logits_fn(x).argmax(1)[pos]
            x_adv = x_rep.clone()
        else:
            x_adv, pred = start[0].to(x.dtype).clone(), start[1].clone()
        by = torch.where(pred == y_rep, ROBUST, CLEAN)
        for k, (name, kwargs, restarts) in enumerate(plan):
            idx = (pred == y_rep).nonzero()[:, 0]   # one host sync per attack, outside its loop
            if idx.numel() == 0:
                break
            rng = Rng(seeds, group[idx], pos[idx], n, x.device)   # reseeded per attack, as pyautoattack
            for r in range(restarts):
                if r:
                    live = (pred[idx] == y_rep[idx]).nonzero()[:, 0]
                    if live.numel() == 0:
                        break
                    idx, rng = idx[live], rng.rows(live)
                adv = _attack_fn(name)(logits_fn, x_rep[idx], y_rep[idx], eps[idx], rng=rng, **kwargs)
                p = logits_fn(adv).argmax(1)            # the verdict on the example itself, as pyautoattack's
                fooled = p != y_rep[idx]
                x_adv[idx] = torch.where(view_rows(fooled, adv), adv.to(x_adv.dtype), x_adv[idx])
                pred[idx] = torch.where(fooled, p, pred[idx])
                by[idx] = torch.where(fooled, k, by[idx])
    return x_adv, pred, by


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
