"""fastfat.AutoAttack: the AutoAttack authors' class (fra31/auto-attack, the interface most papers'
scripts call; pyautoattack 0.2.0's keyword spellings too) over fastfat's own batched ensemble,
printing the class-wise table and recording which attack fooled each sample (docs/backend.md).

    from fastfat import AutoAttack          # was: from autoattack import AutoAttack
    adversary = AutoAttack(model, norm='Linf', eps=8/255, version='standard', seed=0)
    x_adv = adversary.run_standard_evaluation(x_test, y_test, bs=250)
    adversary.fooled_by, adversary.records  # per sample; eval.json-style class-wise records

l_inf only, versions 'standard' and 'custom' (apgd-ce, apgd-t, fab-t, square); L2 / L1 and the
'plus' / 'rand' versions are refused at construction (use pyautoattack for them).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..errors import UserError
from .ensemble import SUB_ATTACKS
from .subattacks import APGD, APGDTargeted, FAB, Square

VERSIONS = ("standard", "custom")


def _refuse_unsupported(norm, version, attacks, is_tf_model) -> list[str]:
    """The attacks to run, or UserError (a ValueError) naming what fastfat does not implement."""
    if norm != "Linf":
        raise UserError(f"fastfat.AutoAttack implements norm='Linf' only, got norm={norm!r}; "
                        "use pyautoattack (the authors' package) for L2 and L1")
    if version not in VERSIONS:
        raise UserError(f"fastfat.AutoAttack implements version 'standard' and 'custom', got {version!r}; "
                        "use pyautoattack (the authors' package) for 'plus' and 'rand'")
    if is_tf_model:
        raise UserError("fastfat.AutoAttack takes a torch nn.Module only (is_tf_model=True); "
                        "use pyautoattack for TensorFlow models")
    if version == "standard":
        if attacks:
            raise UserError("attacks_to_run will be overridden unless you use version='custom'")
        return list(SUB_ATTACKS)
    if not attacks:
        raise UserError(f"version='custom' needs attacks_to_run, a list from {list(SUB_ATTACKS)}")
    bad = [a for a in attacks if a not in SUB_ATTACKS]
    if bad:
        raise UserError(f"fastfat.AutoAttack runs {list(SUB_ATTACKS)}; {bad} are not implemented "
                        "here: use pyautoattack (the authors' package) for them")
    return list(attacks)


class AutoAttack:
    """The AutoAttack authors' class with fastfat's batched attacks (l_inf, inputs in [0, 1]).

    model: any nn.Module mapping [N, C, H, W] in [0, 1] to logits [N, num_classes] (normalization
    inside it); num_classes is read from its output. It is attacked in eval mode, BN-folded where
    its layers allow (fastfat.backend.prepare); its train/eval mode, requires_grad and .grad are
    restored after each run. eps in (0, 1] (pixel units); seed None: time-based, as the authors'.
    Settings users change live on the sub-attack objects (apgd, apgd_targeted, fab, square);
    fastfat honours n_iter, n_restarts, rho, n_target_classes (capped at num_classes - 1),
    n_queries, p_init, and refuses the others at run time when changed. `attacks=` and
    `batch_size=` are pyautoattack 0.2.0's spellings of `attacks_to_run=` and `bs=`.

    After a run: fooled_by (per sample: the attack that fooled it, 'clean' for a clean
    misclassification, None when robust), robust ([N] bool), records (eval.json-style: clean and
    the ensemble's class-wise accuracy, worst class, VCRA), and the verbose log."""

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 0.3, version: str = "standard",
                 seed: int | None = None, verbose: bool = True, attacks_to_run=(), device=None,
                 log_path: str | None = None, *, attacks=None, is_tf_model: bool = False):
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self.model, self.norm, self.epsilon = model, norm, None
        self.attacks_to_run = _refuse_unsupported(norm, version, list(attacks or attacks_to_run or []),
                                                  is_tf_model)
        from ..backend.prepare import check_eps
        self.epsilon = check_eps(eps)
        self.version, self.seed, self.verbose, self.log_path = version, seed, verbose, log_path
        self.device = device
        self.apgd = APGD(self.epsilon, seed)
        self.apgd_targeted = APGDTargeted(self.epsilon, seed)
        self.fab = FAB(self.epsilon, seed)
        self.square = Square(self.epsilon, seed)
        if version == "custom":
            self.apgd.n_restarts = 5   # the authors' constructor value, which only "standard" lowers to 1
        self.fooled_by, self.robust, self.records = None, None, None
        if version == "standard":
            self._log("setting parameters for standard version")

    # ---- the authors' interface -----------------------------------------------------------

    def get_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def get_seed(self) -> int:
        return int(time.time()) if self.seed is None else int(self.seed)

    def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                return_labels: bool = False, *, batch_size: int | None = None,
                                state_path=None):
        """The ensemble on (x_orig [N, C, H, W] in [0, 1], y_orig [N]) in batches of bs. Returns
        x_adv (x_orig's shape, dtype and device; within eps and [0, 1]; x_orig's own row for a
        clean misclassification or a robust sample), or (x_adv, labels [N]) with return_labels
        or with pyautoattack's spelling batch_size= (its return). state_path: refused (pyautoattack's
        resumable evaluation is not implemented)."""
        if state_path is not None:
            raise UserError("state_path (pyautoattack's resumable evaluation) is not implemented "
                            "in fastfat.AutoAttack")
        from .evaluation import evaluate
        x_adv, labels = evaluate(self, x_orig, y_orig, bs if batch_size is None else batch_size)
        return (x_adv, labels) if (return_labels or batch_size is not None) else x_adv

    def run_standard_evaluation_individual(self, x_orig: torch.Tensor, y_orig: torch.Tensor,
                                           bs: int = 250, return_labels: bool = False, *,
                                           batch_size: int | None = None) -> dict:
        """Each attack of attacks_to_run alone on all samples: {name: x_adv}, or {name: (x_adv,
        labels)} with return_labels or batch_size= (pyautoattack's form)."""
        attacks, verbose = self.attacks_to_run, self.verbose
        self._log(f"using {self.version} version including {', '.join(attacks)}.")
        out = {}
        try:
            self.verbose = False
            for name in attacks:
                t0 = time.time()
                self.attacks_to_run = [name]
                x_adv, labels = self.run_standard_evaluation(x_orig, y_orig, bs, return_labels=True,
                                                             batch_size=batch_size)
                pair = return_labels or batch_size is not None
                out[name] = (x_adv, labels) if pair else x_adv
                if verbose:
                    acc = float((labels.to(y_orig.device) == y_orig).double().mean())
                    self.verbose = True
                    self._log(f"robust accuracy by {name.upper()} \t {acc:.2%} \t (time attack: "
                              f"{time.time() - t0:.1f} s)")
                    self.verbose = False
        finally:
            self.attacks_to_run, self.verbose = attacks, verbose
        return out

    def clean_accuracy(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250) -> float:
        """The model's accuracy on (x_orig, y_orig), in eval mode, batches of bs."""
        from ..backend.prepare import attackable
        with attackable(self.model, x_orig[:8], fold=False) as (model, _), torch.no_grad():
            hits = sum(int((model(x_orig[i:i + bs]).argmax(1) == y_orig[i:i + bs]).sum())
                       for i in range(0, x_orig.shape[0], bs))
        acc = hits / max(x_orig.shape[0], 1)
        self._log(f"clean accuracy: {acc:.2%}")
        return acc

    # ---- internals --------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        """The authors' Logger: print, and append to log_path when given."""
        if not self.verbose:
            return
        print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(msg + "\n")

    def _plan(self, num_classes: int) -> list[tuple[str, dict, int]]:
        """The run's plan (ensemble.run_plan's form) from the sub-attack objects' settings, each
        checked; refused: DLR-based attacks with fewer classes than they need."""
        subs = {"apgd-ce": self.apgd, "apgd-t": self.apgd_targeted, "fab-t": self.fab, "square": self.square}
        for name in self.attacks_to_run:
            subs[name].check(name, self.epsilon)
        if "apgd-t" in self.attacks_to_run and num_classes < 4:
            raise UserError(f"apgd-t (targeted DLR loss) needs at least 4 classes; the model has "
                            f"{num_classes}: use version='custom' with attacks_to_run without apgd-t")
        return [(name, subs[name].kwargs(name, num_classes), subs[name].restarts(name))
                for name in self.attacks_to_run]

