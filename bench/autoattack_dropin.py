"""fastfat.AutoAttack (the drop-in for the authors' class) against pyautoattack's AutoAttack, as a
user's evaluation script calls them, on a model fastfat did not build: a CNN with normalization
inside and BatchNorm, Madry-trained on the digits by a plain PyTorch loop. Each radius of EPS is
one run of each (the drop-in takes one eps, as the authors' class), seed 0, bs = all images.

    python -m bench.autoattack --models user      (the row beside fastfat's own models)
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from pyautoattack import AutoAttack as PyAutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

import fastfat
from fastfat.data.datasets import load_dataset


class UserCNN(nn.Module):
    """A user-style model: inputs in [0, 1] normalized inside, conv + BatchNorm + ReLU blocks, no
    fastfat fold pairs (fastfat.AutoAttack folds its BNs through torch.fx)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), 0.4))
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.fc(self.features((x - self.mean) / self.std))


def trained_user_model(epochs: int = 5, eps: float = 0.2, seed: int = 0) -> nn.Module:
    """UserCNN Madry-trained (PGD-5, step eps/4) on the digits' training split by a plain loop."""
    torch.manual_seed(seed)
    train = load_dataset("digits")[0]
    x, y = train.images.float() / 255, train.labels
    model = UserCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            b = perm[i:i + 128]
            x_adv = fastfat.pgd(model.eval(), x[b], y[b], eps, eps / 4, 5)
            loss = nn.functional.cross_entropy(model.train()(x_adv), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _lower(adv, n_iter: int | None, n_queries: int | None, pyaa: bool, eps: float) -> None:
    """Fewer iterations / queries on either package's object alike (smoke runs)."""
    if n_iter is not None:
        if pyaa:   # its APGD fixes its step-size checkpoints in the constructor: rebuild
            kw = dict(n_iter=n_iter, norm="Linf", eps=eps, seed=adv.seed, eot_iter=1, rho=0.75, device="cpu")
            adv.apgd = APGDAttack(adv.model, n_restarts=1, **kw)
            adv.apgd_targeted = APGDAttack_targeted(adv.model, n_restarts=1, n_target_classes=9, **kw)
        else:
            adv.apgd.n_iter = adv.apgd_targeted.n_iter = n_iter
        adv.fab.n_iter = n_iter
    if n_queries is not None:
        adv.square.n_queries = n_queries


def compare_dropin(model, x, y, eps_list, seed: int = 0, n_iter: int | None = None,
                   n_queries: int | None = None) -> dict:
    """Both classes' run_standard_evaluation at each eps: seconds (wall, process CPU), ratios, and
    per eps the robust counts, the largest per-class difference and the per-sample agreement."""
    res = {"attack": "aa (drop-in)", "pyautoattack_s": 0.0, "fastfat_s": 0.0,
           "pyautoattack_cpu_s": 0.0, "fastfat_cpu_s": 0.0}
    for eps in eps_list:
        theirs = PyAutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed)
        theirs.verbose = False
        _lower(theirs, n_iter, n_queries, True, eps)
        ours = fastfat.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, verbose=False)
        _lower(ours, n_iter, n_queries, False, eps)
        t0, c0 = time.perf_counter(), time.process_time()
        _, pred = theirs.run_standard_evaluation(x, y, batch_size=len(y))
        t1, c1 = time.perf_counter(), time.process_time()
        ours.run_standard_evaluation(x, y, bs=len(y))
        t2, c2 = time.perf_counter(), time.process_time()
        res["pyautoattack_s"] += t1 - t0
        res["fastfat_s"] += t2 - t1
        res["pyautoattack_cpu_s"] += c1 - c0
        res["fastfat_cpu_s"] += c2 - c1
        a, b = ours.robust, pred == y
        diff = torch.bincount(y, weights=a.double(), minlength=10) - torch.bincount(y, weights=b.double(), minlength=10)
        res[eps] = {"robust_fastfat": int(a.sum()), "robust_pyautoattack": int(b.sum()),
                    "max_class_diff": int(diff.abs().max()), "agree": float((a == b).double().mean())}
    res["ratio"] = res["pyautoattack_s"] / res["fastfat_s"]
    res["cpu_ratio"] = res["pyautoattack_cpu_s"] / res["fastfat_cpu_s"]
    return res
