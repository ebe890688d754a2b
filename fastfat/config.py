"""Typed configuration: one dataclass per job, validated at the edge.

The same objects drive the CLI (fastfat.cli.flags makes a flag of each field, with the field's
help text), the Python API and the sweep files. Presets fill fields first; anything the user gives explicitly wins.
eps values are in [0, 1] pixel units and accept fractions such as "8/255".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import methods
from .config_dict import from_dict
from .config_values import (canonical_attack, check_choice, check_int_at_least, check_range, check_seed, opt,
                            parse_eps, resolve_step)
from .autoattack.standard import IMPLS as AA_IMPLS   # the AutoAttack implementations
from .attacks import SINGLE_STEP, SINGLE_STEP_SIZE, TRAIN_ATTACKS
from .errors import UserError

# Every training method is a fastfat.methods registry entry (its names, bases, needs).
METHODS = methods.NAMES
SCHEDULES = ("paper", "authors", "constant")
LOADERS = ("auto", "memory", "torchvision", "ffcv")
AMP_MODES = ("auto", "off", "bf16", "fp16")
CO_GUARDS = ("auto", "off", "warn", "stop")   # the catastrophic-overfitting guard (fastfat.guard)
ATTACK_BN = ("eval", "train")


def has_lambda(method: str) -> bool:
    """Whether a method has FAT's lambda (FAT on a base method), as the registry says."""
    return method in methods.LAMBDA


def attacks_in_training(method: str) -> bool:
    """Whether a method trains on an attack (all but natural training); False for an unknown name."""
    return method in methods.BY_NAME and method not in methods.NO_ATTACK


def base_method(method: str) -> str | None:
    """The method a robust-fairness method is compared against (fat-madry -> madry), or None for
    a base method itself (natural, madry, trades) or a name the registry does not hold."""
    return methods.BASES.get(method)


# ---------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """TrainConfig's own fields (the method's hyperparameters come from fastfat.methods)."""
    method: str = opt("madry", " | ".join(METHODS) + " (fat-*: Fair AT; docs/methods.md)")
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
    train_attack: str = opt("pgd", "pgd (steps of step_size) | fgsm-rs | n-fgsm: single-step, whose step is "
                                   "single_step_size (steps and step_size unused; docs/fast.md)")
    single_step_size: str = opt("auto", "the single-step attacks' step: auto (fgsm-rs 1.25*eps, n-fgsm "
                                        "eps), a number, or relative such as \"eps/2\", \"1.5*eps\"")
    nfgsm_noise: float = opt(2.0, "n-fgsm: its start noise is U(-k eps, k eps) for this k")
    co_guard: str = opt("auto", "catastrophic-overfitting guard, scored each epoch on a held-out batch: "
                                "auto (warn for fgsm-rs / n-fgsm, off for pgd) | off | warn | stop "
                                "(end the run on the best epoch's weights)")
    co_threshold: float = opt(0.5, "the guard flags an epoch whose PGD accuracy is below (1 - this) "
                                   "x its best so far")
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
    test_per_class: int | None = opt(None, "evaluate on the first N test samples of every class (a "
                                           "stratified subset, the file's order; not with test_limit)")
    drop_last: bool = opt(False, "drop the last partial training batch")
    val_per_class: float | None = opt(None, "hold out N training samples per class (N >= 1) or a "
                                            "fraction of each class (0 < f < 1) to select the best "
                                            "epoch on (best.pt beside checkpoint.pt); None: off")
    val_attack: str = opt("pgd10", "the per-epoch robust evaluation of the validation split, at eps_train")
    init_from: str | None = opt(None, "start from this checkpoint's weights (weights only: the optimizer, "
                                      "schedule and log start afresh); FRL fine-tunes from one. In a sweep, "
                                      "a method's name (e.g. \"trades\") means that method's point of the "
                                      "same dataset, model, eps_train and seed, trained first")
    teacher: str | None = opt(None, "distillation methods: the teacher's checkpoint (digest-checked). In a "
                                    "sweep, a method's name means that method's point of the same "
                                    "dataset, model, eps_train and seed, trained first")
    attack_bn: str = opt("eval", "BatchNorm while crafting the training attack: eval (running statistics, "
                                 "fastfat's default) | train (batch statistics, running statistics "
                                 "updated by every attack step: CFA's official code; docs/methods.md)")
    nesterov: bool = opt(False, "SGD with Nesterov momentum (DAFA's code; off as the paper and FAT's code)")
    num_workers: int = opt(0, "torchvision loader only")
    preset: str = opt("", "which preset filled the defaults (recorded, not re-applied)")

    @property
    def has_lambda(self) -> bool:
        return has_lambda(self.method)

    @property
    def guard(self) -> str:
        """co_guard with "auto" resolved: "warn" for a single-step training attack, else "off"."""
        if self.co_guard != "auto":
            return self.co_guard
        return "warn" if self.train_attack in SINGLE_STEP else "off"

    def alpha(self) -> float:
        """The training attack's step size in pixel units (single_step_size for a single-step one)."""
        if self.train_attack in SINGLE_STEP:
            spec = self.single_step_size
            return resolve_step(SINGLE_STEP_SIZE[self.train_attack] if spec == "auto" else spec, self.eps_train)
        return resolve_step(self.step_size, self.eps_train)

    def validate(self) -> "TrainConfig":
        from .data import dataset_info
        from .models import canonical_model_name

        check_choice("method", self.method, METHODS)
        self.model = canonical_model_name(self.model)
        info = dataset_info(self.dataset)
        self.dataset = info.name
        check_choice("loader", self.loader, LOADERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("vcar_mode", self.vcar_mode, ("paper", "authors"))
        check_range("eps_train", self.eps_train, 0.0, 1.0)
        check_range("lam", self.lam, 0.0, math.inf)
        check_range("beta", self.beta, 0.0, math.inf)
        check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        if self.clip_grad_norm is not None:
            check_range("clip_grad_norm", self.clip_grad_norm, 0.0, math.inf, low_open=True)
        check_int_at_least("lam_warmup_epochs", self.lam_warmup_epochs, 0)
        check_seed(self.seed)
        for name in ("steps", "epochs", "batch_size"):
            check_int_at_least(name, getattr(self, name), 1)
        if self.width is not None:
            check_int_at_least("width", self.width, 1)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                check_int_at_least(name, getattr(self, name), 1)
        if self.crop_pad is not None:
            check_int_at_least("crop_pad", self.crop_pad, 0)
        self._validate_train_per_class()
        _validate_test_per_class(self)
        from .data.split import check_test_per_class
        check_test_per_class(self.test_per_class, self.dataset)
        check_int_at_least("num_workers", self.num_workers, 0)
        self._validate_train_attack()
        try:
            a = self.alpha()
        except UserError as e:
            step = "single_step_size" if self.train_attack in SINGLE_STEP else "step_size"
            raise UserError(f"{step}: {e}") from None
        # a step of 0 never moves the attack: only natural training has no attack
        check_range("step_size", a, 0.0, 1.0, low_open=attacks_in_training(self.method))
        if self.superclass and info.num_classes != 100:
            raise UserError("superclass VCAR needs dataset cifar100")
        try:
            self.val_attack = canonical_attack(self.val_attack)
        except UserError as e:
            raise UserError(f"val_attack: {e}") from None
        if self.val_per_class is not None:
            check_range("val_per_class", self.val_per_class, 0.0, math.inf, low_open=True)
            if self.val_per_class >= 1 and not float(self.val_per_class).is_integer():
                raise UserError(f"val_per_class must be a whole number of samples (>= 1) or a "
                                f"fraction in (0, 1), got {self.val_per_class}")
            if self.loader == "ffcv":
                raise UserError("val_per_class needs the memory or torchvision loader (the FFCV "
                                "files hold the whole training set)")
            if self.eps_train == 0.0:
                raise UserError("val_per_class selects on robust accuracy at eps_train: it needs eps_train > 0")
        if attacks_in_training(self.method) and self.eps_train == 0.0:
            raise UserError(f"method {self.method} needs eps_train > 0 (natural training is --method natural)")
        methods.check_config(self)   # every registered method's hyperparameters
        self._validate_method_needs()
        return self

    def _validate_train_attack(self) -> None:
        """train_attack, nfgsm_noise, co_guard and co_threshold, and whether the method can train
        with a single-step attack (natural has none; methods with their own multi-step attack
        schedule cannot)."""
        check_choice("train_attack", self.train_attack, TRAIN_ATTACKS)
        check_range("nfgsm_noise", self.nfgsm_noise, 0.0, math.inf)
        check_choice("co_guard", self.co_guard, CO_GUARDS)
        check_range("co_threshold", self.co_threshold, 0.0, 1.0, low_open=True)
        if self.train_attack in SINGLE_STEP and not attacks_in_training(self.method):
            raise UserError(f"train_attack {self.train_attack}: method {self.method} cannot train with a "
                            f"single-step attack (it crafts no attack; docs/methods.md)")
        if self.train_attack in SINGLE_STEP and self.method in methods.NO_SINGLE_STEP:
            raise UserError(f"train_attack {self.train_attack}: method {self.method} cannot train with a "
                            f"single-step attack (its attack counts or stops at its own PGD steps; docs/methods.md)")
        if self.guard != "off" and not attacks_in_training(self.method):
            raise UserError("co_guard: natural training has no attack to overfit (use co_guard off)")

    def _validate_method_needs(self) -> None:
        """attack_bn, and what the registry says cfg.method needs: a validation split, a model
        to fine-tune (init_from), a teacher."""
        check_choice("attack_bn", self.attack_bn, ATTACK_BN)
        if self.attack_bn == "train" and not attacks_in_training(self.method):
            raise UserError("attack_bn train: natural training crafts no attack")
        if self.nesterov and self.momentum == 0:
            raise UserError("nesterov needs momentum > 0 (Nesterov's look-ahead is along the momentum)")
        if self.attack_bn == "train" and self.amp == "fp16":
            # fp16's per-sample loss scaling (attacks._input_grad) is exact only for independent
            # samples; batch statistics couple them
            raise UserError("attack_bn train does not run under --amp fp16 (use bf16 or off)")
        for name in ("init_from", "teacher"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise UserError(f"{name}: give a checkpoint path (or leave it unset)")
        if self.method in methods.NEEDS_VALIDATION and self.val_per_class is None:
            raise UserError(f"method {self.method} updates its class weights from a validation split: "
                            f"give --val-per-class (their code holds out 300 of CIFAR-10's 5000 per "
                            f"class: 0.06)")
        if self.method in methods.FINE_TUNE and self.init_from is None:
            raise UserError(f"method {self.method} fine-tunes a trained model: give --init-from "
                            f"CHECKPOINT (e.g. a trades run's checkpoint.pt; in a sweep, "
                            f"init_from = \"trades\")")
        if self.method in methods.TEACHER and self.teacher is None:
            raise UserError(f"method {self.method} distils from a teacher: give --teacher CHECKPOINT "
                            f"(in a sweep, teacher = \"trades\" or another method's name)")


    def _validate_train_per_class(self) -> None:
        """train_per_class: a whole number >= 1, at most what each class holds (known for the
        data sets whose class sizes are fixed), in memory (FFCV files hold the whole set)."""
        n = self.train_per_class
        if n is None:
            return
        check_int_at_least("train_per_class", n, 1)
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


def _validate_test_per_class(cfg) -> None:
    """test_per_class (RunConfig and EvalConfig): a whole number >= 1, not beside test_limit, not
    with the FFCV loader; its upper bound is the data set's (data.split.check_test_per_class)."""
    if cfg.test_per_class is None:
        return
    check_int_at_least("test_per_class", cfg.test_per_class, 1)
    if cfg.test_limit is not None:
        raise UserError("give test_per_class or test_limit, not both")
    if cfg.loader == "ffcv":
        raise UserError("test_per_class needs the memory or torchvision loader (FFCV reads the test "
                        "file in order, without its labels)")


@dataclass
class TrainConfig(*reversed(methods.PARAMS), RunConfig):
    """Everything that defines one training run (one grid point): RunConfig's fields, then each
    registered method's hyperparameters (fastfat.methods.PARAMS, in registry order)."""


def _once(name: str, given: list, values: list, what: str) -> list:
    """values (the parsed `given`) unchanged; UserError if two entries are the same value."""
    for i, v in enumerate(values):
        if v in values[:i]:
            first = given[values.index(v)]
            same = (f"{first} is given twice" if str(first) == str(given[i])
                    else f"{first} and {given[i]} are the same {what}")
            raise UserError(f"{name}: {same}; give each {what} once (it would be counted twice)")
    return values


@dataclass
class EvalConfig:
    """What to evaluate a trained model with."""
    attacks: list[str] = opt(factory=lambda: ["fgsm", "pgd20", "cw"], help="fgsm | pgdK (e.g. pgd20) | cw | aa (AutoAttack) | apgd (APGD-CE + APGD-T)")
    eps_test: list[float] = opt(factory=lambda: [16 / 255, 20 / 255], help="l_inf test radii, pixel units (8/255 accepted)")
    batch_size: int = opt(256, "evaluation batch size")
    cw_kappa: float = opt(50.0, "C&W margin kappa")
    seed: int = opt(0, "seeds the attacks' start noise")
    test_limit: int | None = opt(None, "evaluate on the first N test samples only")
    test_per_class: int | None = opt(None, "evaluate on the first N test samples of every class (a "
                                           "stratified subset, the file's order; not with test_limit)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    loader: str = opt("auto", "auto | memory | torchvision | ffcv")
    data_root: str | None = opt(None, "None: the training run's")
    fold_bn: bool = opt(True, "attack a BN-folded copy of the model (eval-mode math)")
    amp: str = opt("off", "off (fp32, the paper's protocol) | bf16 | fp16: autocast for the attacks "
                          "and logits (recorded in eval.json)")
    tf32: bool = opt(False, "CUDA: TF32 for fp32 matmuls and convolutions (recorded in eval.json)")
    worst_k: int = opt(3, "fairness: worst_k_acc is the mean accuracy of the k worst classes")
    aa_impl: str = opt("fastfat", "AutoAttack (aa, apgd) implementation: fastfat (its own, batched; "
                                  "docs/autoattack.md) | pyautoattack (the authors' package, the cross-check)")

    def validate(self) -> "EvalConfig":
        if not self.attacks:
            raise UserError("attacks: give at least one attack (fgsm, pgd20, cw)")
        # A repeated attack or radius would be evaluated and counted twice (class_count doubled):
        # refused, in any spelling (PGD-20 = pgd20, 8/255 = 0.0313725...), as a repeated grid value is.
        self.attacks = _once("attacks", self.attacks, [canonical_attack(a) for a in self.attacks], "attack")
        if not self.eps_test:
            raise UserError("eps_test: give at least one radius")
        self.eps_test = _once("eps_test", self.eps_test, [parse_eps(e) for e in self.eps_test], "radius")
        for e in self.eps_test:
            check_range("eps_test", e, 0.0, 1.0, low_open=True)
        check_int_at_least("batch_size", self.batch_size, 1)
        check_int_at_least("worst_k", self.worst_k, 1)
        check_range("cw_kappa", self.cw_kappa, 0.0, math.inf)
        check_seed(self.seed)
        if self.test_limit is not None:
            check_int_at_least("test_limit", self.test_limit, 1)
        check_choice("loader", self.loader, LOADERS)
        _validate_test_per_class(self)
        check_choice("amp", self.amp, AMP_MODES[1:])
        check_choice("aa_impl", self.aa_impl, AA_IMPLS)
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
    cfg = from_dict(TrainConfig, values).validate()
    # Here, not in validate(): a stored run's config that recorded an unused teacher (accepted
    # before this check) still loads for evaluation.
    if cfg.teacher is not None and cfg.method not in methods.TEACHER:
        raise UserError(f"teacher: method {cfg.method} does not distil from a teacher (those that "
                        f"do: {', '.join(methods.TEACHER)}); drop --teacher")
    return cfg


def make_eval_config(preset: str | None = None, **overrides) -> EvalConfig:
    """A validated EvalConfig: the training preset's eval defaults first, then overrides."""
    values = dict(PRESETS[preset]["eval"]) if preset in PRESETS else {}
    values.update(overrides)
    return from_dict(EvalConfig, values).validate()
