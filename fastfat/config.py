"""Typed configuration: one dataclass per job, validated at the edge.

The same objects drive the CLI (fastfat.cli.flags makes a flag of each field, with the field's
help text), the Python API and the sweep files. Presets fill fields first; anything the user gives explicitly wins.
eps values are in [0, 1] pixel units and accept fractions such as "8/255".
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields

# single values: parsing and the checks validate() makes (re-exported: other modules import them here)
from .config_values import (SEED_LIMIT, _choice, _int_at_least, _range, _seed, canonical_attack,  # noqa: F401
                            parse_eps, resolve_step)
from .errors import UserError

METHODS = ("natural", "madry", "trades", "fat-madry", "fat-trades",
           "cfa-madry", "cfa-trades", "dafa-madry", "dafa-trades",
           "wat", "frl-rw", "frl-rwrm")   # peers: fastfat.methods
FAT_PREFIX = "fat-"   # FAT on a base method: fat-madry, fat-trades
SCHEDULES = ("paper", "authors", "constant")
LOADERS = ("auto", "memory", "torchvision", "ffcv")
AMP_MODES = ("auto", "off", "bf16", "fp16")


def has_lambda(method: str) -> bool:
    """Whether a method is FAT on a base method, the only methods with a lambda."""
    return method.startswith(FAT_PREFIX)


# The base method each robust-fairness method modifies (beyond FAT, whose base is its suffix):
# the report's rho and paired comparisons measure a method against its base.
BASE_METHODS: dict[str, str] = {"cfa-madry": "madry", "cfa-trades": "trades",
                                 "dafa-madry": "madry", "dafa-trades": "trades",
                                 "wat": "trades", "frl-rw": "trades", "frl-rwrm": "trades"}


# Methods that fine-tune a trained model: init_from required (a sweep resolves a method name in it).
FINE_TUNE_METHODS = ("frl-rw", "frl-rwrm")


def base_method(method: str) -> str | None:
    """The method a robust-fairness method is compared against (fat-madry -> madry), or None for
    a base method itself (natural, madry, trades)."""
    if has_lambda(method):
        return method[len(FAT_PREFIX):]
    return BASE_METHODS.get(method)


# ---------------------------------------------------------------------------------------------

def opt(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A config field with its --help text (read by fastfat.cli.flags)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines one training run (one grid point)."""
    method: str = opt("madry", "natural | madry | trades | fat-madry | fat-trades (Fair AT) | "
                               "cfa-madry | cfa-trades | dafa-madry | dafa-trades | wat | frl-rw | "
                               "frl-rwrm")
    model: str = opt("resnet18", "resnet18 | resnet50 | wrn-32-10 (= wrn-34-10) | preactresnet18 | cnn")
    width: int | None = opt(None, "first-stage channels (None: the model's full width)")
    dataset: str = opt("cifar10", "cifar10 | cifar100 | fashion-mnist | mnist | svhn | stl10 | digits | "
                                  "synthetic")
    data_root: str = opt("data", "where the data set files are (or go, with --download)")
    download: bool = opt(False, "fetch the data set through torchvision if missing")
    loader: str = opt("auto", "auto | memory | torchvision | ffcv")
    eps_train: float = opt(8 / 255, "l_inf training radius, pixel units")
    steps: int = opt(10, "PGD steps of the training attack")
    step_size: str = opt("0.007", "number, or relative such as \"eps/10\"")
    lam: float = opt(0.0, "FAT's lambda (weight of VCAR)")
    beta: float = opt(6.0, "TRADES' beta")
    vcar_mode: str = opt("paper", "paper (Eq. 12) | authors (their code's VCAR)")
    superclass: bool = opt(False, "CIFAR-100: VCAR over the 20 superclasses")
    epochs: int = opt(120, "training epochs")
    batch_size: int = opt(128, "training batch size")
    lr: float = opt(0.1, "initial SGD learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(2e-4, "SGD weight decay")
    schedule: str = opt("paper", "paper (x0.1 at 1/2, x0.01 at 2/3) | authors | constant")
    clip_grad_norm: float | None = opt(None, "clip the gradient's global L2 norm to this before each "
                                             "SGD step (None: off, as the paper and the authors' code)")
    lam_warmup_epochs: int = opt(0, "FAT: lambda rises linearly from 0 over this many epochs, step by "
                                    "step (0: off, as the paper)")
    # CFA and DAFA (fastfat.methods, README). Epoch counts: N >= 1 epochs or a fraction of the run's.
    cfa_lambda1: float = opt(0.5, "CFA: class radius (lambda1 + train robust acc of the class) * eps")
    cfa_lambda2: float = opt(0.5, "CFA on TRADES: class beta (lambda2 + train robust acc) * beta")
    cfa_begin: float = opt(10, "CFA: calibrate from this (0-based) epoch on, N or a fraction of the "
                               "epochs (theirs: 10); eps and beta before it")
    cfa_fawa: bool = opt(True, "CFA: evaluate FAWA's weight average (needs --val-per-class)")
    cfa_fawa_decay: float = opt(0.85, "CFA's FAWA decay (the paper's 0.85; their code's 0.88)")
    cfa_fawa_threshold: float = opt(0.2, "CFA's FAWA updates when the validation worst-class robust "
                                         "accuracy is >= this (the paper's 0.2; their code's 0.24)")
    dafa_lambda: float = opt(1.0, "DAFA's lambda (their CIFAR-10 1.0; CIFAR-100 and STL-10 1.5)")
    dafa_warmup: float = opt(70, "DAFA: class weights from the adversarial softmax of this epoch, "
                                 "used after it; N or a fraction of the epochs (theirs: 70 of 110)")
    seed: int = opt(0, "seeds the initial weights, batch order, augmentation and attack noise")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: str = opt("auto", "auto (bf16 on CUDA, off on CPU) | off | bf16 (fast on CPUs with AVX512-BF16) | fp16")
    channels_last: bool = opt(True, "channels_last memory layout for the model and batches")
    compile: bool = opt(False, "torch.compile the model")
    tf32: bool = opt(False, "CUDA: TF32 for fp32 matmuls and convolutions (faster, 10-bit mantissas)")
    cudnn_benchmark: bool = opt(False, "CUDA: let cuDNN time its algorithms per shape (faster, not reproducible)")
    deterministic: bool = opt(False, "CUDA: deterministic algorithms only, so a resumed run repeats "
                                     "an uninterrupted one bit for bit (slower)")
    fold_bn: bool = opt(True, "attack a BN-folded copy of the model (eval-mode math)")
    crop_pad: int | None = opt(None, "None: the data set's default")
    flip: bool | None = opt(None, "None: the data set's default")
    train_limit: int | None = opt(None, "train on the first N samples only")
    train_per_class: int | None = opt(None, "train on N samples of every class, a stratified draw "
                                            "from the seed's stream (val_per_class is then held out "
                                            "of this pool); None: the whole training set")
    test_limit: int | None = opt(None, "evaluate on the first N test samples only")
    drop_last: bool = opt(False, "drop the last partial training batch")
    val_per_class: float | None = opt(None, "hold out N training samples per class (N >= 1) or a "
                                            "fraction of each class (0 < f < 1) to select the best "
                                            "epoch on (best.pt beside checkpoint.pt); None: off")
    val_attack: str = opt("pgd10", "the per-epoch robust evaluation of the validation split, at eps_train")
    init_from: str | None = opt(None, "start from this checkpoint's weights (weights only: the optimizer, "
                                      "schedule and log start afresh); FRL fine-tunes from one. In a sweep, "
                                      "a method's name (e.g. \"trades\") means that method's point of the "
                                      "same dataset, model, eps_train and seed, trained first")
    wat_eta: float = opt(0.1, "WAT: Hedge learning rate on the classes' cumulative validation TRADES "
                              "loss (their code's 0.1)")
    frl_bound_nat: float | None = opt(None, "FRL: how far a class's clean error may exceed the average "
                                            "(tau; None: 0.1 for frl-rw, 0.07 for frl-rwrm, their code's)")
    frl_bound_bndy: float | None = opt(None, "FRL: the same for the boundary error (None: 0.1 for frl-rw, "
                                             "0.07 for frl-rwrm)")
    frl_rate_nat: float = opt(0.05, "FRL: step of the clean-error multipliers (their code's 0.05)")
    frl_rate_bndy: float = opt(0.1, "FRL: step of the boundary-error multipliers (their code: twice "
                                    "the clean step)")
    frl_rate_margin: float = opt(0.2, "FRL-RWRM: step of the radius multipliers (their code's 0.2)")
    frl_lim: float = opt(0.5, "FRL: the multipliers of each kind sum to at most this (their code's "
                              "0.5); below 1, every class keeps a positive loss weight")
    frl_margin_max: float = opt(3.0, "FRL-RWRM: the largest factor a class's radius grows by (their "
                                     "code's 3)")
    num_workers: int = opt(0, "torchvision loader only")
    preset: str = opt("", "which preset filled the defaults (recorded, not re-applied)")

    @property
    def has_lambda(self) -> bool:
        return has_lambda(self.method)

    def alpha(self) -> float:
        """The training attack's step size in pixel units."""
        return resolve_step(self.step_size, self.eps_train)

    def validate(self) -> "TrainConfig":
        from .data import dataset_info
        from .models import canonical_model_name

        _choice("method", self.method, METHODS)
        self.model = canonical_model_name(self.model)
        info = dataset_info(self.dataset)
        self.dataset = info.name
        _choice("loader", self.loader, LOADERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("vcar_mode", self.vcar_mode, ("paper", "authors"))
        _range("eps_train", self.eps_train, 0.0, 1.0)
        _range("lam", self.lam, 0.0, math.inf)
        _range("beta", self.beta, 0.0, math.inf)
        _range("lr", self.lr, 0.0, math.inf, low_open=True)
        _range("momentum", self.momentum, 0.0, 1.0)
        _range("weight_decay", self.weight_decay, 0.0, math.inf)
        if self.clip_grad_norm is not None:
            _range("clip_grad_norm", self.clip_grad_norm, 0.0, math.inf, low_open=True)
        _int_at_least("lam_warmup_epochs", self.lam_warmup_epochs, 0)
        _seed(self.seed)
        for name in ("steps", "epochs", "batch_size"):
            _int_at_least(name, getattr(self, name), 1)
        if self.width is not None:
            _int_at_least("width", self.width, 1)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)
        if self.crop_pad is not None:
            _int_at_least("crop_pad", self.crop_pad, 0)
        self._validate_train_per_class()
        _int_at_least("num_workers", self.num_workers, 0)
        try:
            a = self.alpha()
        except UserError as e:
            raise UserError(f"step_size: {e}") from None
        # a step of 0 never moves the attack: only natural training has no attack
        _range("step_size", a, 0.0, 1.0, low_open=self.method != "natural")
        if self.superclass and info.num_classes != 100:
            raise UserError("superclass VCAR needs dataset cifar100")
        self.val_attack = canonical_attack(self.val_attack)
        if self.val_per_class is not None:
            _range("val_per_class", self.val_per_class, 0.0, math.inf, low_open=True)
            if self.val_per_class >= 1 and not float(self.val_per_class).is_integer():
                raise UserError(f"val_per_class must be a whole number of samples (>= 1) or a "
                                f"fraction in (0, 1), got {self.val_per_class}")
            if self.loader == "ffcv":
                raise UserError("val_per_class needs the memory or torchvision loader (the FFCV "
                                "files hold the whole training set)")
            if self.eps_train == 0.0:
                raise UserError("val_per_class selects on robust accuracy at eps_train: it needs eps_train > 0")
        if self.method != "natural" and self.eps_train == 0.0:
            raise UserError(f"method {self.method} needs eps_train > 0 (natural training is --method natural)")
        from .methods import check_config   # CFA's and DAFA's fields
        check_config(self)
        self._validate_peer_fields()
        return self

    def _validate_train_per_class(self) -> None:
        """train_per_class: a whole number >= 1, at most what each class holds (known for the
        data sets whose class sizes are fixed), in memory (FFCV files hold the whole set)."""
        n = self.train_per_class
        if n is None:
            return
        _int_at_least("train_per_class", n, 1)
        if self.train_limit is not None:
            raise UserError("give train_per_class or train_limit, not both")
        if self.loader == "ffcv":
            raise UserError("train_per_class needs the memory or torchvision loader (the FFCV "
                            "files hold the whole training set)")
        from .data.split import TRAIN_PER_CLASS
        have = TRAIN_PER_CLASS.get(self.dataset)
        if have is not None and n > have:
            raise UserError(f"train_per_class {n}: every class of {self.dataset}'s training set "
                            f"holds at most {have} samples")

    def _validate_peer_fields(self) -> None:
        """init_from (WAT's and FRL's own fields: fastfat.methods.check_config)."""
        if self.init_from is not None and not str(self.init_from).strip():
            raise UserError("init_from: give a checkpoint path (or leave it unset)")
        if self.method in FINE_TUNE_METHODS and self.init_from is None:
            raise UserError(f"method {self.method} fine-tunes a trained model: give --init-from "
                            f"CHECKPOINT (e.g. a trades run's checkpoint.pt; in a sweep, "
                            f"init_from = \"trades\")")


@dataclass
class EvalConfig:
    """What to evaluate a trained model with."""
    attacks: list[str] = opt(factory=lambda: ["fgsm", "pgd20", "cw"], help="fgsm | pgdK (e.g. pgd20) | cw | aa (AutoAttack) | apgd (APGD-CE + APGD-T)")
    eps_test: list[float] = opt(factory=lambda: [16 / 255, 20 / 255], help="l_inf test radii, pixel units (8/255 accepted)")
    batch_size: int = opt(256, "evaluation batch size")
    cw_kappa: float = opt(50.0, "C&W margin kappa")
    seed: int = opt(0, "seeds the attacks' start noise")
    test_limit: int | None = opt(None, "evaluate on the first N test samples only")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    loader: str = opt("auto", "auto | memory | torchvision | ffcv")
    data_root: str | None = opt(None, "None: the training run's")
    fold_bn: bool = opt(True, "attack a BN-folded copy of the model (eval-mode math)")
    amp: str = opt("off", "off (fp32, the paper's protocol) | bf16 | fp16: autocast for the attacks "
                          "and logits (recorded in eval.json)")
    tf32: bool = opt(False, "CUDA: TF32 for fp32 matmuls and convolutions (recorded in eval.json)")
    worst_k: int = opt(3, "fairness: worst_k_acc is the mean accuracy of the k worst classes")

    def validate(self) -> "EvalConfig":
        if not self.attacks:
            raise UserError("attacks: give at least one attack (fgsm, pgd20, cw)")
        self.attacks = list(dict.fromkeys(canonical_attack(a) for a in self.attacks))
        if not self.eps_test:
            raise UserError("eps_test: give at least one radius")
        self.eps_test = [parse_eps(e) for e in self.eps_test]
        for e in self.eps_test:
            _range("eps_test", e, 0.0, 1.0, low_open=True)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("worst_k", self.worst_k, 1)
        _range("cw_kappa", self.cw_kappa, 0.0, math.inf)
        _seed(self.seed)
        if self.test_limit is not None:
            _int_at_least("test_limit", self.test_limit, 1)
        _choice("loader", self.loader, LOADERS)
        _choice("amp", self.amp, AMP_MODES[1:])
        return self


# ---------------------------------------------------------------------------------------------
# Presets: named starting points. Explicit values always override them.

PRESETS: dict[str, dict[str, dict]] = {
    # Section 7.1 of the paper: PGD-20 with step eps/10, lr 0.1 / 10 at epochs 60 and 80 of 120.
    "paper": {
        "train": dict(steps=20, step_size="eps/10", epochs=120, lr=0.1, momentum=0.9,
                      weight_decay=2e-4, schedule="paper", batch_size=128, vcar_mode="paper"),
        "eval": dict(eps_test=[16 / 255, 20 / 255]),
    },
    # wzekai99/FAT pgd_var.py: PGD-10 step 0.007, x0.1/0.01/0.005 at 60/90/110, batch 256.
    "authors": {
        "train": dict(steps=10, step_size="0.007", epochs=120, lr=0.1, momentum=0.9,
                      weight_decay=2e-4, schedule="authors", batch_size=256, vcar_mode="authors"),
        "eval": dict(eps_test=[16 / 255, 20 / 255]),
    },
    # CPU-sized: the offline digits set, the small CNN (a narrow ResNet18 learns digits poorly
    # under attack), PGD-5; eps_test at and above eps_train, the regime where the paper's
    # tradeoff shows (see fastfat/grids/demo.toml).
    "demo": {
        "train": dict(dataset="digits", model="cnn", width=32, steps=5, step_size="eps/4",
                      eps_train=0.15, epochs=15, lr=0.05, batch_size=64, schedule="paper",
                      vcar_mode="paper", weight_decay=5e-4),
        "eval": dict(eps_test=[0.15, 0.25]),
    },
}


def make_train_config(preset: str | None = None, **overrides) -> TrainConfig:
    """A validated TrainConfig: preset values first, then overrides. Unknown keys are errors."""
    values = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset]["train"])
        values["preset"] = preset
    values.update(overrides)
    return from_dict(TrainConfig, values).validate()


def make_eval_config(preset: str | None = None, **overrides) -> EvalConfig:
    """A validated EvalConfig: the training preset's eval defaults first, then overrides."""
    values = dict(PRESETS[preset]["eval"]) if preset in PRESETS else {}
    values.update(overrides)
    return from_dict(EvalConfig, values).validate()


# ---------------------------------------------------------------------------------------------
# dict / JSON plumbing, driven by the dataclass fields

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config dataclass from a dict, coercing types; UserError on unknown keys or bad types."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; "
                        f"valid: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})


_EPS_FIELDS = {"eps_train", "eps_test"}


def _coerce(name: str, value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
        return _coerce(name, value, tp)
    if typing.get_origin(tp) is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(name, v, inner) for v in value]
    if name in _EPS_FIELDS:
        try:
            return parse_eps(value)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected a number, got {value!r}")
        return parse_eps(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value
