"""One grid point's pieces that the local runner, fused groups and the Ray driver share: the
progress line (say, summary_line), claiming points in the store, and evaluating a trained point's
checkpoints (evaluate_point)."""
from __future__ import annotations

import os
import sys

from ..errors import UserError
from .grid import GridPoint
from ..report.labels import lam_suffix


def say(line: str, progress: bool) -> None:
    """Print a line above the bars (or plainly without them)."""
    if progress:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def summary_line(p: GridPoint, records: list[dict], seconds: float) -> str:
    """One line per finished point: PGD-20 (or the first attack) at the first eps_test."""
    from ..evaluate import attack_title, eps_label
    rob = [r for r in records if r["attack"] != "clean"]
    first = min(r["eps"] for r in rob)
    pick = next((r for r in rob if r["attack"] == "pgd20" and r["eps"] == first),
                next(r for r in rob if r["eps"] == first))
    clean = next((r for r in records if r["attack"] == "clean"), None)
    t = p.train
    lam = lam_suffix(t.method, t.lam, " lam ")
    s = (f"{t.method} {t.model} eps_train {eps_label(t.eps_train)}{lam} seed {t.seed}: "
         f"{attack_title(pick['attack'])} @ {eps_label(pick['eps'])} rob.acc {100 * pick['avg_acc']:.2f}% "
         f"var {100 * pick['vcra']:.2f}e-2")
    if clean is not None:
        s += f", clean {100 * clean['avg_acc']:.2f}%"
    return s + f" ({seconds:.0f} s)"


def evaluate_point(p: GridPoint, run_dir: str) -> list[dict]:
    """Evaluate a trained point's checkpoints in run_dir as p.eval says: evaluate()'s records of
    the last epoch's checkpoint.pt, each with "checkpoint": "last", then, for a point trained with
    val_per_class, those of best.pt (the epoch selected on the validation split) with
    "checkpoint": "best". Local sweeps, fused groups (once per member) and Ray tasks all evaluate
    through here. UserError if a point trained with val_per_class has no best.pt."""
    import copy

    import torch

    from ..data import dataset_info
    from ..evaluate import evaluate, make_test_loader
    from ..runtime import resolve_device
    from ..selection import BEST
    from ..runfiles import load_model

    # The checkpoints on disk, so a point killed after training and before its results were
    # stored is evaluated on the same weights.
    device = resolve_device(p.train.device if p.eval.device == "auto" else p.eval.device)
    loader = make_test_loader(p.train, p.eval, device)
    num_classes = dataset_info(p.train.dataset).num_classes
    last, _ = load_model(os.path.join(run_dir, "checkpoint.pt"), device)
    records = [dict(r, checkpoint="last")
               for r in evaluate(last, loader, p.eval, num_classes, device=device)]  # amp: p.eval.amp
    if p.train.val_per_class is None:
        return records
    path = os.path.join(run_dir, BEST)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: the point was trained with val_per_class, so its "
                        f"run should hold the selected epoch's weights there")
    best, _ = load_model(path, device)
    a, b = last.state_dict(), best.state_dict()
    if all(torch.equal(a[k], b[k]) for k in a):
        # The last epoch is the best one: the same weights score the same (evaluate is seeded).
        return records + [dict(copy.deepcopy(r), checkpoint="best") for r in records]
    return records + [dict(r, checkpoint="best")
                      for r in evaluate(best, loader, p.eval, num_classes, device=device)]


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def claim_point(store, p: GridPoint, counts: dict, progress: bool) -> bool:
    """Claim a point for this process; True if it is now ours. Otherwise counts it (done:
    'skipped', running elsewhere: 'busy', failed in another process during this run:
    'failed_elsewhere'). Says when a stale claim was taken over."""
    return bool(claim_points(store, [p], counts, progress))


def claim_points(store, points: list[GridPoint], counts: dict, progress: bool) -> list[GridPoint]:
    """Claim a fused group's points at once (Store.claim_group: none if a live process holds
    any); returns those now ours, counting the others as claim_point does."""
    from .claims import owner_alive

    mine = []
    for p, claim in zip(points, store.claim_group([p.key for p in points])):
        if claim.status != "claimed":  # finished, running or just failed in another process
            counts[{"busy": "busy", "failed": "failed_elsewhere"}.get(claim.status, "skipped")] += 1
            continue
        if claim.took_from:
            why = ("its process is gone" if not owner_alive(claim.took_from) else
                   f"silent for {minutes(claim.silent_s)}, longer than its lease")
            say(f"sweep: took over {p.label()} from {claim.took_from} ({why})", progress)
        mine.append(p)
    return mine
