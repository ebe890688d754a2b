"""AutoAttack, fastfat's implementation against pyautoattack side by side in one run: the demo CNN
and ResNet18 width 16, briefly Madry-trained on digits, the 497 test digits at eps_test 0.2 and
0.25, `apgd` and `aa`, on the BN-folded copy that `fastfat eval` attacks, the same keyed seeds.
Prints wall and CPU seconds, their ratios, how many samples per class the robust counts differ by,
and the share of per-sample verdicts that agree; and the floor: what the samples no attack fools
cost any implementation that runs the ensemble's iterations, at this CPU's best per-row cost of
the model, and so the largest ratio that any such implementation could reach.

The `user` row times fastfat.AutoAttack, the drop-in for the authors' class, against
pyautoattack's AutoAttack on a model fastfat did not build (bench.autoattack_dropin).

    python -m bench.autoattack [--quick] [--models cnn resnet18 user] [--attacks apgd aa] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from fastfat import autoattack
from fastfat.autoattack.common import Logits, ce_loss, channels_last_on_cpu, input_grads_only
from fastfat.config import make_train_config
from fastfat.data import MemoryLoader
from fastfat.data.datasets import load_dataset
from fastfat.models.fold import fold_bn
from fastfat.seeding import eval_noise_seed
from fastfat.train import train

EPS = (0.2, 0.25)
MODELS = {"cnn": dict(model="cnn", width=32), "resnet18": dict(model="resnet18", width=16)}
USER = "user"   # the drop-in row: fastfat.AutoAttack vs pyautoattack.AutoAttack (bench.autoattack_dropin)


def trained_model(name: str, epochs: int = 5) -> torch.nn.Module:
    """The model `name` (demo CNN | ResNet18 w16), Madry-trained at eps 0.2 for a few epochs on the
    digits, in eval mode: robust enough that every attack of the ensemble has work."""
    cfg = make_train_config("demo", method="madry", eps_train=0.2, epochs=epochs, device="cpu",
                            loader="memory", **MODELS[name])
    with tempfile.TemporaryDirectory() as out:
        model, _ = train(cfg, out, progress=False)
    return model.eval()


def digits_test_split(limit: int | None = None):
    """The digits test split (the first `limit` images) as one batch (x, y); not named test_*, so
    pytest does not collect it from the bench module that imports it."""
    test = load_dataset("digits")[1]
    test = test.subset(limit) if limit else test
    return next(iter(MemoryLoader(test, len(test), False)))


def compare(model, x, y, attack: str, seed: int = 0, threads: int = 1, **overrides) -> dict:
    """Both implementations on one batch at every eps of EPS, as `fastfat eval` runs them (batch 0,
    keyed seeds): seconds each, the ratio, and the agreement of the robust sets."""
    attacked = fold_bn(model)
    seeds = [eval_noise_seed(seed, 0, "aa", i) for i in range(len(EPS))]
    # wall and CPU seconds (the process's; one thread): on a shared machine the CPU ratio is the
    # steadier one, other processes' time slices do not count in it
    t0, c0 = time.perf_counter(), time.process_time()
    theirs = [autoattack.run(attacked, x, y, attack, e, s, 10, threads=threads, impl="pyautoattack", **overrides)[1] == y
              for e, s in zip(EPS, seeds)]
    t1, c1 = time.perf_counter(), time.process_time()
    pred = autoattack.run_batch(attacked, x, y, attack, list(EPS), seeds, 10, threads=threads, **overrides)[1]
    t2, c2 = time.perf_counter(), time.process_time()
    n = y.numel()
    res = {"attack": attack, "pyautoattack_s": t1 - t0, "fastfat_s": t2 - t1, "ratio": (t1 - t0) / (t2 - t1),
           "pyautoattack_cpu_s": c1 - c0, "fastfat_cpu_s": c2 - c1, "cpu_ratio": (c1 - c0) / (c2 - c1)}
    for i, e in enumerate(EPS):
        ours, ref = pred[i * n:(i + 1) * n] == y, theirs[i]
        diff = torch.bincount(y, weights=ours.double(), minlength=10) - torch.bincount(y, weights=ref.double(), minlength=10)
        res[e] = {"robust_fastfat": int(ours.sum()), "robust_pyautoattack": int(ref.sum()),
                  "max_class_diff": int(diff.abs().max()), "agree": float((ours == ref).double().mean())}
    return res


def row_costs(attacked, x, threads: int = 1, sizes=(128, 512, 1024)) -> tuple[float, float]:
    """(seconds per row of a forward and input backward, seconds per row of a forward) of the
    attacked model as fastfat's attacks call it (Logits: channels_last, cache-sized slices), the
    best of a few batch sizes: the model's cost per row when nothing else is."""
    best = {True: float("inf"), False: float("inf")}   # with input gradient, forward only
    with channels_last_on_cpu(attacked, x), input_grads_only(attacked):
        logits = Logits(attacked, None, threads)
        for b in sizes:
            xb = x[torch.arange(b) % x.shape[0]].contiguous()
            yb = torch.zeros(b, dtype=torch.long)
            for grad in best:
                for rep in range(4):   # the first is a warm-up
                    t = time.perf_counter()
                    if grad:
                        logits.loss_grad(xb, ce_loss, yb)
                    else:
                        with torch.no_grad():
                            logits(xb)
                    if rep:
                        best[grad] = min(best[grad], (time.perf_counter() - t) / b)
    return best[True], best[False]


def floor(r: dict, costs: tuple[float, float], n_iter: int = 100, targets: int = 9) -> float:
    """Seconds that the samples both implementations leave robust cost any implementation that
    runs the ensemble's iterations: per such sample and radius, APGD-CE's n_iter + 1 and APGD-T's
    targets x (n_iter + 1) forward-backward passes, and for `aa` FAB-T's targets x n_iter passes
    and as many forwards (Square's queries left out: a lower bound), each at costs' per-row
    price. pyautoattack's seconds over this is the largest ratio reachable."""
    fb, f = costs
    robust = sum(min(r[e]["robust_fastfat"], r[e]["robust_pyautoattack"]) for e in EPS)
    per = (1 + targets) * (n_iter + 1) * fb
    if r["attack"] == "aa":
        per += targets * n_iter * (fb + f)
    return robust * per


def line(model: str, r: dict) -> str:
    per_eps = "  ".join(f"eps {e}: robust {r[e]['robust_fastfat']}/{r[e]['robust_pyautoattack']} "
                        f"class diff {r[e]['max_class_diff']} agree {100 * r[e]['agree']:.1f}%" for e in EPS)
    return (f"{model:9s} {r['attack']:5s} pyautoattack {r['pyautoattack_s']:7.1f} s  fastfat {r['fastfat_s']:6.1f} s  "
            f"ratio {r['ratio']:5.2f}x (CPU s {r['pyautoattack_cpu_s']:.1f} / {r['fastfat_cpu_s']:.1f} = "
            f"{r['cpu_ratio']:.2f}x)  {per_eps}"
            + (f"\n{'':15s} floor {r['floor_s']:.1f} s (robust samples x passes x {1e6 * r['costs'][0]:.0f} us "
               f"per row-pass): any implementation at most {r['pyautoattack_s'] / r['floor_s']:.2f}x"
               if r.get("floor_s") else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.autoattack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=[*MODELS, USER], choices=[*MODELS, USER],
                    help=f"{USER}: fastfat.AutoAttack vs pyautoattack's class on a user-style model")
    ap.add_argument("--attacks", nargs="+", default=["apgd", "aa"], choices=list(autoattack.ATTACKS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads / shard workers (default 1, as the demo)")
    ap.add_argument("--quick", action="store_true", help="64 images, 10 iterations, 100 queries (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(n_iter=10, square_n_queries=100) if args.quick else {}
    x, y = digits_test_split(64 if args.quick else None)
    print(f"AutoAttack: pyautoattack vs fastfat, digits {len(y)} test images, eps {list(EPS)}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}"
          + (" (quick: 10 iterations, 100 queries)" if args.quick else " (standard settings)"))
    for name in args.models:
        if name == USER:
            from .autoattack_dropin import compare_dropin, trained_user_model
            r = compare_dropin(trained_user_model(epochs=2 if args.quick else 5), x, y, EPS,
                               n_iter=overrides.get("n_iter"), n_queries=overrides.get("square_n_queries"))
            print(line("user CNN", r), flush=True)
            continue
        model = trained_model(name, epochs=2 if args.quick else 5)
        costs = row_costs(fold_bn(model), x, args.threads)
        for attack in args.attacks:
            r = compare(model, x, y, attack, threads=args.threads, **overrides)
            r.update(costs=costs, floor_s=floor(r, costs, overrides.get("n_iter", 100)))
            print(line(name, r), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (the machine is shared: ratios are side by side)")


if __name__ == "__main__":
    main()
