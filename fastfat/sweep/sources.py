"""Where a sweep's points start from: an init_from or teacher that names a grid method
("trades") becomes that method's point's checkpoint, run first (resolve_init_from), and an
init_from or teacher that names a checkpoint file is read and matched to its points before the
database exists (_check_init_files)."""
from __future__ import annotations

import os

from .. import methods
from ..config import METHODS, attacks_in_training
from ..errors import UserError

# The points are grid.GridPoints (not imported: grid imports this module).


def resolve_init_from(points: list[GridPoint], runs: str) -> list[GridPoint]:
    """Points whose init_from names a grid method (FRL's init_from = "trades") start from that
    method's point of the same dataset, model, eps_train and seed, and points whose teacher names
    one (Fair-ARD's teacher = "trades") distil from it: the field becomes that point's checkpoint
    (runs/<key>/checkpoint.pt, the last epoch's), and they run after every point they start or
    learn from (the grid's order otherwise). Their keys were made from the method's name, so they
    do not depend on where the runs are. UserError, before any work, when the grid has no such
    point, has several (a lam axis), the source itself starts from another point, or a point
    names two sources."""
    _check_init_files(points)
    by_ident = {}
    for q in points:
        t = q.train
        by_ident.setdefault((t.method, t.dataset, t.model, t.eps_train, t.seed), []).append(q)
    first, later = [], []
    for p in points:
        t = p.train
        fields_ = [f for f in ("init_from", "teacher") if getattr(t, f) in METHODS]
        if not fields_:
            first.append(p)
            continue
        if len(fields_) > 1:
            raise UserError(f"{p.label()}: init_from and teacher both name a grid method; a point "
                            f"starts from at most one other point (give one as a checkpoint path)")
        field = fields_[0]
        source = getattr(t, field)
        eps = t.eps_train if attacks_in_training(source) else 0.0   # a natural point sits at eps_train 0
        found = by_ident.get((source, t.dataset, t.model, eps, t.seed), [])
        want = (f"a {source} point of dataset {t.dataset}, model {t.model}, eps_train "
                f"{eps:.4g}, seed {t.seed}")
        if source in methods.FINE_TUNE or source in methods.TEACHER:
            kind = "fine-tuned" if source in methods.FINE_TUNE else "distilled"
            raise UserError(f"{p.label()}: {field} = \"{source}\" is itself {kind}; name a method "
                            f"trained from scratch (e.g. \"trades\")")
        if not found:
            raise UserError(f"{p.label()}: {field} = \"{source}\" needs {want} in the grid; "
                            f"add {source} to grid.method")
        if len(found) > 1:
            raise UserError(f"{p.label()}: {field} = \"{source}\" matches {len(found)} points "
                            f"(they differ in lam); give one")
        setattr(t, field, os.path.join(runs, found[0].key, "checkpoint.pt"))
        p.depends_on = found[0].key
        later.append(p)
    return first + later


def _check_init_files(points: list[GridPoint]) -> None:
    """Checkpoint files named by init_from and teacher (not a grid method's name) are read
    (their digest, weights only: a pickle never runs) and matched to every point starting from
    or distilling from them before the database exists: UserError naming the key, where a point
    would otherwise fail only when it runs. init_from must fit the point's model; a teacher must
    be trained on the point's data set, with finite weights. A name that is no file but looks
    like a grid method's ("TRADES", "trade") is called so."""
    import difflib

    from ..runfiles import load_init_weights, load_teacher
    checked = set()
    for p in points:
        t = p.train
        for key, value in (("init_from", t.init_from), ("teacher", t.teacher)):
            if value is None or value in METHODS or (key, value, t.model, t.width, t.dataset) in checked:
                continue
            checked.add((key, value, t.model, t.width, t.dataset))
            if not os.path.exists(value):
                near = difflib.get_close_matches(value.lower(), METHODS, n=1, cutoff=0.75)
                hint = (f"; did you mean the grid method \"{near[0]}\" (names are lower case)?" if near else
                        f"; give a checkpoint file or a grid method's name ({', '.join(METHODS)})")
                raise UserError(f"[train] {key} = \"{value}\": no such checkpoint{hint}")
            try:
                load_init_weights(t) if key == "init_from" else load_teacher(t, "cpu")
            except UserError as e:
                msg = str(e).removeprefix(f"{key}: ")
                raise UserError(f"[train] {key} = \"{value}\" ({p.label()}): {msg}") from None
