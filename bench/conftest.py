"""Benchmark sizes and shared fixtures.

Each benchmark times the fast path and its reference twin in the same pytest-benchmark group.
Two scales:
- "full" (when benchmarking): the bench.compare workload per step, ResNet18 width 16, batch 128,
  32x32 images;
- "small" (under --benchmark-disable, as CI runs them once as plain tests): tiny sizes, so the
  whole bench directory finishes in about a minute while still exercising every code path.
BENCH_SCALE=small|full overrides the choice (e.g. quick local comparisons of benchmark JSONs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Two cores shared with other jobs: the same thread count in every run keeps saved baselines
# comparable (torch's default is one per core).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass(frozen=True)
class Scale:
    name: str
    width: int          # ResNet18 first-stage channels
    batch: int          # training / attack batch
    steps: int          # PGD steps of the training attack
    eval_images: int    # test images in the evaluation pass
    eval_attacks: tuple
    rounds: int         # pedantic rounds per benchmark


SCALES = {
    "full": Scale("full", width=16, batch=128, steps=10, eval_images=64,
                  eval_attacks=("fgsm", "pgd20", "cw"), rounds=3),
    "small": Scale("small", width=4, batch=32, steps=2, eval_images=32,
                   eval_attacks=("fgsm", "pgd2", "cw"), rounds=1),
}


def _scale_name(config) -> str:
    forced = os.environ.get("BENCH_SCALE", "").strip().lower()
    if forced:
        if forced not in SCALES:
            raise pytest.UsageError(f"BENCH_SCALE must be one of {', '.join(SCALES)}, not {forced!r}")
        return forced
    disabled = config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    return "small" if disabled else "full"


@pytest.fixture(scope="session")
def scale(request) -> Scale:
    return SCALES[_scale_name(request.config)]


def pytest_report_header(config):
    return f"fastfat bench scale: {_scale_name(config)} (torch threads {torch.get_num_threads()})"


def pytest_configure(config):
    config.addinivalue_line("markers", "ffcv: FFCV data path (numba compile, seconds)")
