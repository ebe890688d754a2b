"""The sub-attack objects of fastfat.AutoAttack (adversary.apgd, .apgd_targeted, .fab, .square): the
settings the AutoAttack authors' objects expose, those fastfat honours and those it fixes.

Setting an attribute the authors' object does not have is refused at once (a typo would silently
do nothing); changing a fixed one is refused when the evaluation runs, naming it.
"""
from __future__ import annotations

from ..errors import UserError


class _SubAttack:
    TITLE = ""
    HONOURED: dict = {}   # name -> the standard version's value; fastfat runs what is set
    FIXED: dict = {}      # name -> the only value fastfat implements
    FREE = ("seed", "verbose", "device", "logger", "eps")   # kept, without effect on fastfat's run

    def __init__(self, eps: float, seed):
        for k, v in {**self.HONOURED, **self.FIXED}.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "verbose", False)

    def __setattr__(self, name: str, value) -> None:
        if name not in self.HONOURED and name not in self.FIXED and name not in self.FREE:
            known = sorted({*self.HONOURED, *self.FIXED})
            raise AttributeError(f"{self.TITLE} has no setting {name!r} in fastfat.AutoAttack; "
                                 f"its settings: {', '.join(known)}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={getattr(self, k)!r}" for k in (*self.HONOURED, *self.FIXED))
        return f"{self.TITLE}({items})"

    def check(self, name: str, eps: float) -> None:
        """UserError when a fixed setting was changed or an honoured count is not an int >= 1."""
        for k, v in self.FIXED.items():
            if getattr(self, k) != v:
                raise UserError(f"{self.TITLE}.{k} = {getattr(self, k)!r}: fastfat.AutoAttack implements "
                                f"only {v!r} (use pyautoattack for other values)")
        if float(self.eps) != eps:
            raise UserError(f"{self.TITLE}.eps = {self.eps!r} differs from the AutoAttack's eps {eps!r}: "
                            "give eps to AutoAttack(...)")
        for k in self.HONOURED:
            v = getattr(self, k)
            if isinstance(self.HONOURED[k], int) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"{self.TITLE}.{k} must be an integer >= 1, got {v!r}")
            if isinstance(self.HONOURED[k], float) and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise UserError(f"{self.TITLE}.{k} must be a number in (0, 1], got {v!r}")

    def restarts(self, name: str) -> int:
        return 1


class APGD(_SubAttack):
    """adversary.apgd: APGD-CE (one run per restart on the samples still robust)."""
    TITLE = "apgd"
    HONOURED = dict(n_iter=100, n_restarts=1, rho=0.75)
    FIXED = dict(norm="Linf", eot_iter=1, use_largereps=False, topk=None)
    FREE = _SubAttack.FREE + ("loss",)

    def kwargs(self, name: str, num_classes: int) -> dict:
        return dict(n_iter=self.n_iter, rho=float(self.rho))

    def restarts(self, name: str) -> int:
        return self.n_restarts


class APGDTargeted(APGD):
    """adversary.apgd_targeted: APGD-T on the targeted DLR loss, n_target_classes capped at C - 1."""
    TITLE = "apgd_targeted"
    HONOURED = dict(n_iter=100, n_restarts=1, rho=0.75, n_target_classes=9)

    def kwargs(self, name: str, num_classes: int) -> dict:
        return dict(n_iter=self.n_iter, rho=float(self.rho),
                    n_target_classes=min(self.n_target_classes, num_classes - 1))


class FAB(_SubAttack):
    """adversary.fab: FAB-T, n_target_classes capped at C - 1 (one restart: the ensemble's
    fab-t sets n_restarts to 1, as the authors' does)."""
    TITLE = "fab"
    HONOURED = dict(n_iter=100, n_target_classes=9)
    FIXED = dict(norm="Linf", alpha_max=0.1, eta=1.05, beta=0.9)
    FREE = _SubAttack.FREE + ("targeted", "n_restarts")

    def kwargs(self, name: str, num_classes: int) -> dict:
        return dict(n_iter=self.n_iter, n_target_classes=min(self.n_target_classes, num_classes - 1))


class Square(_SubAttack):
    """adversary.square: Square (margin loss), the p schedule on the query index unless
    rescale_schedule (pyautoattack's name) is set."""
    TITLE = "square"
    HONOURED = dict(n_queries=5000, p_init=0.8)
    FIXED = dict(norm="Linf", n_restarts=1, loss="margin")
    FREE = _SubAttack.FREE + ("rescale_schedule",)

    def __init__(self, eps: float, seed):
        super().__init__(eps, seed)
        object.__setattr__(self, "rescale_schedule", False)

    def kwargs(self, name: str, num_classes: int) -> dict:
        return dict(n_queries=self.n_queries, p_init=float(self.p_init), rescale=bool(self.rescale_schedule))
