"""`fastfat theory`: the paper's Section 5 in closed form, checked by simulation, printed."""
from __future__ import annotations

import os

from ..errors import UserError
from ..files import check_writable_dir
from ..theory import DEFAULT_EPS_TRAIN, DEFAULTS, Mixture
from ..theory_run import run_theory


def _eps_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--eps-train must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UserError("--eps-train is empty")
    return sorted(set(vals))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "theory", help="Section 5: closed-form vs simulated class-wise robustness of linear "
                       "classifiers on a Gaussian mixture")
    p.add_argument("--out", required=True, help="directory for theory.json and theory.png")
    p.add_argument("--d", type=int, default=DEFAULTS["d"], help="dimension (default %(default)s)")
    p.add_argument("--mu-pos", type=float, default=DEFAULTS["mu_pos"], help="mu+ (default %(default)s)")
    p.add_argument("--mu-neg", type=float, default=DEFAULTS["mu_neg"], help="mu- (default %(default)s)")
    p.add_argument("--sigma-pos", type=float, default=DEFAULTS["sigma_pos"], help="sigma+ (default %(default)s)")
    p.add_argument("--sigma-neg", type=float, default=DEFAULTS["sigma_neg"], help="sigma- (default %(default)s)")
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="prior of class +1 (default %(default)s)")
    p.add_argument("--eps-train", default=",".join(f"{e:g}" for e in DEFAULT_EPS_TRAIN),
                   help="comma-separated eps_train grid (default %(default)s)")
    p.add_argument("--eps-test", type=float, default=DEFAULTS["eps_test"], help="default %(default)s")
    p.add_argument("--n", type=int, default=DEFAULTS["n"],
                   help="training samples, and as many test samples (default %(default)s)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                   help="independent simulation replicates, for the error bars (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="default %(default)s")
    p.set_defaults(func=run)


def run(args) -> int:
    m = Mixture(args.d, args.mu_pos, args.mu_neg, args.sigma_pos, args.sigma_neg, args.alpha)
    eps_grid = _eps_list(args.eps_train)
    check_writable_dir(args.out, "--out", ("theory.json", "theory.png"))
    result = run_theory(m, eps_grid, args.eps_test, args.n, args.seed, args.repeats, args.out)
    sim = [p["simulation"] for p in result["points"]]
    theory = [p["theory"] for p in result["points"]]
    print(f"K = {result['K']:.4f}   (d log(alpha sigma- / ((1-alpha) sigma+)))")
    print(" eps_train  acc+ th/sim     acc- th/sim     avg th/sim      VCRA x1e-2 th/sim")
    for e, t, s in zip(eps_grid, theory, sim):
        print(f" {e:9.3f}  {t['acc_pos']:.3f}/{s['acc_pos']:.3f}   {t['acc_neg']:.3f}/{s['acc_neg']:.3f}"
              f"   {t['avg']:.3f}/{s['avg']:.3f}   {100 * t['vcra']:.3f}/{100 * s['vcra']:.3f}")
    c55 = result["theorem_5_5"]
    print(f"Theorem 5.5 (sigma- >= sigma+: {c55['applies']}; class -1 the weaker at eps_train=0: "
          f"{c55['class_minus_weaker_at_eps_train_0']}): VCRA increasing in eps_train: "
          f"theory {c55['theory_increasing']}, simulation {c55['simulation_increasing']}")
    held = [r for r in result["theorem_5_7"] if r["conditions"]]
    print(f"Theorem 5.7: VCRA(adv) >= VCRA(nat) at {sum(r['holds'] for r in held)}/{len(held)} "
          f"grid points meeting its conditions (equal-variance models)")
    print(f"largest |simulation - theory| of class-wise accuracy: {result['max_abs_z_classwise']:.1f} SE")
    print(f"wrote {os.path.join(args.out, 'theory.png')} and {os.path.join(args.out, 'theory.json')}")
    return 0
