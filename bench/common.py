"""Workloads shared by the benchmark suites, bench.compare and bench.gpu: the same data, model and
configs for the fast path and the reference, so each pair times the same work, on the config's
device (the CPU unless fat_config(device=...) says otherwise)."""
from __future__ import annotations

import copy
import dataclasses

import torch

from fastfat import reference
from fastfat.config import make_train_config
from fastfat.data import DATASETS, ImageSet, make_synthetic
from fastfat.runtime import resolve_device
from fastfat.runfiles import build_for_config

# The synthetic set at CIFAR's geometry: 32x32x3, 10 classes, crop pad 4 + flip.
INFO32 = dataclasses.replace(DATASETS["synthetic"], size=32, crop_pad=4)


def synthetic32(n_train: int, n_test: int = 0, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test) uint8 32x32x3 synthetic sets, learnable (one template per class + noise)."""
    return make_synthetic(n_train, n_test, seed=seed, info=INFO32)


def fat_config(**overrides):
    """The benchmark's training config: FAT on Madry (lambda 0.5, paper VCAR), ResNet18 at width
    16, batch 128, the authors' PGD-10 (step 0.007, eps 8/255), crop pad 4 + flip, constant lr,
    fp32 on the CPU. Any field can be overridden."""
    values = dict(dataset="synthetic", model="resnet18", width=16, method="fat-madry", lam=0.5,
                  eps_train=8 / 255, steps=10, step_size="0.007", batch_size=128, epochs=1,
                  lr=0.1, schedule="constant", crop_pad=4, flip=True, device="cpu", amp="off",
                  seed=0, loader="memory")
    values.update(overrides)
    return make_train_config(None, **values)


def twin_models(cfg):
    """(fast model, reference model) with the same initial weights, on cfg.device: the fast one
    as the trainer builds it (channels_last when cfg says so), the reference one in contiguous
    NCHW, as the authors' code holds it."""
    fast = build_for_config(cfg, resolve_device(cfg.device))
    ref = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    return fast, ref


def reference_stepper(cfg, model):
    """step(x, y, generator) -> loss: one reference.ref_train_step of cfg's method and attack on
    model, with an SGD optimizer of cfg's lr, momentum and weight decay (as ref_train builds it).
    x may be in any layout: the reference gets it as contiguous NCHW, as the authors' code."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)

    def step(x, y, generator):
        return reference.ref_train_step(
            model, opt, x.contiguous(), y, method=cfg.method, eps=cfg.eps_train, alpha=cfg.alpha(),
            steps=cfg.steps, lam=cfg.lam, beta=cfg.beta, mode=cfg.vcar_mode,
            superclass=cfg.superclass, num_classes=10, generator=generator)
    return step


def batch(n: int, seed: int = 0, size: int = 32, num_classes: int = 10, device="cpu"):
    """A float batch x [n, 3, size, size] in [0, 1] (NCHW) and labels y [n] covering the classes,
    drawn on the CPU (the same numbers for every device) and moved to device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.arange(n) % num_classes
    return x.to(device), y[torch.randperm(n, generator=g)].to(device)


def ref_update(x_adv, x, grad, alpha, eps):
    """The update inside reference.ref_pgd's loop, line for line (out of place, as the authors)."""
    x_adv = x_adv.detach() + alpha * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return torch.clamp(x_adv, 0.0, 1.0)
