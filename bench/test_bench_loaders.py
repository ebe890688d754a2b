"""Loader throughput, side by side in one benchmark group: one training epoch (shuffle, crop
pad 4, flip, float [0, 1] batches of 256) over the same 2048 synthetic 32x32x3 images through
the FFCV loader (numba pipeline, one thread), the memory loader (batched torch ops) and the
torchvision DataLoader (per-sample PIL transforms). images/s goes into extra_info.

The FFCV pipeline is compiled by a warm-up epoch outside the timing. Runs once, fast, under
`pytest bench --benchmark-disable`. In CI (CI=true) the FFCV case never skips.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

from fastfat.data import DATASETS, MemoryLoader, TorchvisionLoader, ffcv_installed, make_synthetic
from fastfat.data.ffcv import keep_torch_threads

N, BATCH = 2048, 256
INFO = dataclasses.replace(DATASETS["synthetic"], size=32, crop_pad=4)
IN_CI = os.environ.get("CI", "").lower() == "true"
with keep_torch_threads():   # importing ffcv sets torch's thread count to 1
    HAVE_FFCV = ffcv_installed()


@pytest.fixture(scope="module")
def train_set():
    return make_synthetic(N, 10, info=INFO)[0]


def make_loader(kind, data, tmp_path_factory):
    common = dict(seed=0, crop_pad=INFO.crop_pad, flip=True)
    if kind == "memory":
        return MemoryLoader(data, BATCH, True, **common)
    if kind == "torchvision":
        return TorchvisionLoader(data, BATCH, True, **common)
    from fastfat.data.ffcv import FFCVLoader, write_betons
    path = str(tmp_path_factory.mktemp("bench_beton") / "synthetic32_train.beton")
    write_betons([(path, data)])
    loader = FFCVLoader(path, batch_size=BATCH, train=True, info=INFO, **common)
    sum(len(y) for _, y in loader)   # warm-up: numba compiles the pipeline on the first epoch
    return loader


@pytest.mark.benchmark(group="loaders: train epoch, 2048 images 32x32x3")
@pytest.mark.parametrize("kind", [
    pytest.param("ffcv", marks=[pytest.mark.ffcv, pytest.mark.skipif(
        not IN_CI and not HAVE_FFCV, reason="ffcv not installed (pip install 'fastfat[ffcv]')")]),
    "memory",
    "torchvision",
])
def test_loader_throughput(benchmark, kind, train_set, tmp_path_factory):
    loader = make_loader(kind, train_set, tmp_path_factory)

    def epoch():
        n = 0
        for x, y in loader:
            n += len(y)
        return n

    assert benchmark.pedantic(epoch, rounds=3, iterations=1) == N
    if benchmark.stats is not None:   # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(N / benchmark.stats.stats.mean)
