"""The `fastfat theory` run: fastfat.theory's closed forms and simulation at each eps_train,
the checks of Theorems 5.5 and 5.7, and the figure (theory.png) and numbers (theory.json)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict

import numpy as np

from .errors import UserError
from .files import atomic_write_json, atomic_write_png
from .theory import K_constant, Mixture, simulate, theorem_5_7_conditions, theory_point


def _increasing(values) -> bool:
    return bool(np.all(np.diff(values) > 0))


def theorem_5_5_check(m: Mixture, eps_grid, eps_test: float, theory_vcra, sim_vcra) -> dict:
    nat = theory_point(m, 0.0, eps_test)
    return dict(
        statement="VCRA(f_adv) increases with eps_train if sigma- >= sigma+",
        applies=m.sigma_neg >= m.sigma_pos,
        class_minus_weaker_at_eps_train_0=nat["acc_neg"] <= nat["acc_pos"],
        eps_train_le_eps_test=max(eps_grid) <= eps_test,
        theory_increasing=_increasing(theory_vcra),
        simulation_increasing=_increasing(sim_vcra))


def theorem_5_7_check(m: Mixture, eps_grid, eps_test: float) -> list[dict]:
    """VCRA(f_adv) / VCRA(f_nat) at eps_test on the equal-variance models sigma in {sigma+,
    sigma-} (Theorem 5.7 assumes sigma+ = sigma-); the theorem says ratio >= 1 when its
    conditions hold."""
    rows = []
    for s in sorted({m.sigma_pos, m.sigma_neg}):
        me = Mixture(m.d, m.mu_pos, m.mu_neg, s, s, m.alpha)
        v_nat = theory_point(me, 0.0, eps_test)["vcra"]
        for eps in eps_grid:
            if eps > 0:
                v_adv = theory_point(me, eps, eps_test)["vcra"]
                rows.append(dict(sigma=s, eps_train=eps, conditions=theorem_5_7_conditions(me, eps, eps_test),
                                 vcra_nat=v_nat, vcra_adv=v_adv,
                                 ratio=v_adv / v_nat if v_nat > 0 else float("inf"),
                                 holds=v_adv >= v_nat))
    return rows


def plot(path: str, eps_grid, sim: list[dict], m: Mixture, eps_test: float, n_runs: int) -> None:
    """Three panels against eps_train: class-wise robust accuracy, average robust accuracy,
    VCRA; theory as lines, simulation as points (replicate means) with 2-SE bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = np.linspace(0, max(eps_grid), 61)
    curve = [theory_point(m, e, eps_test) for e in fine]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("class-wise robust accuracy (%)", [("acc_pos", "se_acc_pos", "C0", "class +1"),
                                                   ("acc_neg", "se_acc_neg", "C3", "class -1")], 100),
              ("average robust accuracy (%)", [("avg", "se_avg", "C2", "average")], 100),
              ("VCRA (x$10^{-2}$)", [("vcra", "se_vcra", "C4", "VCRA")], 100)]
    for ax, (title, series, scale) in zip(axes, panels):
        for key, se, color, label in series:
            ax.plot(fine, [scale * c[key] for c in curve], color=color, label=f"{label}: theory")
            ax.errorbar(eps_grid, [scale * r[key] for r in sim], yerr=[2 * scale * r[se] for r in sim],
                        fmt="o", ms=4, color=color, capsize=2, label=f"{label}: simulation")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("eps_train")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Linear classifier on the Gaussian mixture: d={m.d}, mu+={m.mu_pos:g}, "
                 f"mu-={m.mu_neg:g}, sigma+={m.sigma_pos:g}, sigma-={m.sigma_neg:g}, "
                 f"alpha={m.alpha:g}, eps_test={eps_test:g}\n"
                 f"lines: closed forms (Thm 5.3); points: trained models, mean of {n_runs} runs, "
                 f"bars +-2 SE", fontsize=9)
    fig.tight_layout()
    atomic_write_png(path, fig, dpi=80)
    plt.close(fig)


def run_theory(m: Mixture, eps_grid: list[float], eps_test: float, n: int, seed: int, repeats: int,
               out: str) -> dict:
    """Closed forms and simulation at every eps_train of eps_grid; writes out/theory.png and
    out/theory.json (atomically) and returns the JSON's content. Checks everything first."""
    m.validate()
    if not (math.isfinite(eps_test) and eps_test >= 0):
        raise UserError(f"--eps-test must be >= 0, got {eps_test}")
    if n < 100:
        raise UserError(f"--n must be at least 100, got {n}")
    if repeats < 2:
        raise UserError(f"--repeats must be at least 2 (the error bars need a spread), got {repeats}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory")
    theory = [theory_point(m, e, eps_test) for e in eps_grid]   # raises on bad eps_train
    theory_vca = [theory_point(m, e, 0.0) for e in eps_grid]

    sim = simulate(m, eps_grid, eps_test, n, seed, repeats)
    z = [abs(s[k] - t[k]) / s[f"se_{k}"] if s[f"se_{k}"] > 0 else 0.0
         for s, t in zip(sim, theory) for k in ("acc_pos", "acc_neg")]
    result = dict(
        params=dict(asdict(m), eps_train=eps_grid, eps_test=eps_test, n=n, repeats=repeats, seed=seed),
        K=K_constant(m),
        points=[dict(eps_train=e, theory=t, vca_theory=v["vcra"], simulation=s)
                for e, t, v, s in zip(eps_grid, theory, theory_vca, sim)],
        max_abs_z_classwise=max(z),
        theorem_5_5=theorem_5_5_check(m, eps_grid, eps_test, [t["vcra"] for t in theory],
                                      [s["vcra"] for s in sim]),
        theorem_5_7=theorem_5_7_check(m, eps_grid, eps_test),
    )
    os.makedirs(out, exist_ok=True)
    plot(os.path.join(out, "theory.png"), eps_grid, sim, m, eps_test, repeats)
    atomic_write_json(os.path.join(out, "theory.json"), result)
    return result
