"""FFCV data path: `fastfat data convert`, FFCVLoader against MemoryLoader, file validation.

All FFCV tests live in this one module and share module-scoped converted files and loaders:
numba compiles each FFCV loader's pipeline on its first batch (about 4 s for the first in a
process, 1-2 s for each further one), so few loaders are iterated. Validation tests never
iterate, so they compile nothing. Marked `ffcv`. With CI=true nothing here skips: a missing
ffcv fails the tests instead.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastfat import cli
from fastfat.data import (DATASETS, ImageSet, MemoryLoader, beton_paths, build_loader,
                          ffcv_installed, load_dataset)
from fastfat.errors import UserError
from fastfat.data.ffcv import keep_torch_threads

IN_CI = os.environ.get("CI", "").lower() == "true"
with keep_torch_threads():   # importing ffcv sets torch's thread count to 1
    HAVE_FFCV = ffcv_installed()
pytestmark = [
    pytest.mark.ffcv,
    pytest.mark.skipif(not IN_CI and not HAVE_FFCV,
                       reason="ffcv not installed (pip install 'fastfat[ffcv]')"),
]

CIFAR = DATASETS["cifar10"]
N_BATCH, N_TEST = 20, 60   # fake CIFAR-10: 5 x 20 train images, 60 test images


def write_fake_cifar10(root, seed=0):
    """Random uint8 images and labels in torchvision's cifar-10-batches-py pickle layout."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    for name, n in [(f"data_batch_{i}", N_BATCH) for i in range(1, 6)] + [("test_batch", N_TEST)]:
        d = {b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(d, f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cifar source root, .beton directory) after converting fake CIFAR-10 and digits."""
    root = str(tmp_path_factory.mktemp("cifar_src"))
    out = str(tmp_path_factory.mktemp("betons"))
    write_fake_cifar10(root)
    for name in ("cifar10", "digits"):
        assert cli.main(["data", "convert", "--dataset", name, "--data-root", root, "--out", out]) == 0
    return root, out


@pytest.fixture(scope="module")
def cifar(converted):
    return load_dataset("cifar10", converted[0])


@pytest.fixture(scope="module")
def aug_loader(converted):
    """The one augmenting FFCV loader (fake CIFAR-10 train, crop pad 4, flip), iterated by
    several tests so that its pipeline is compiled once."""
    return build_loader("ffcv", "cifar10", "train", data_root=converted[1], batch_size=32, seed=5)


def batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def test_ffcv_imports():
    # In CI this fails (rather than skips) when ffcv is missing or its native build is broken.
    import ffcv.loader  # noqa: F401


def test_convert_writes_the_beton_paths_layout(converted, capsys):
    _, out = converted
    for name in ("cifar10", "digits"):
        assert all(os.path.isfile(p) for p in beton_paths(out, name))
        assert cli.main(["data", "check", "--dataset", name, "--data-root", out]) == 0
    assert "100 images 32x32x3, labels 0..9" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_test_split_is_bit_identical_to_memory_loader(converted, dataset):
    root, out = converted
    limit = 50 if dataset == "cifar10" else None   # cifar10: also checks `limit` = first N
    threads = torch.get_num_threads()
    f = build_loader("ffcv", dataset, "test", data_root=out, batch_size=16, limit=limit)
    m = build_loader("memory", dataset, "test", data_root=root, batch_size=16, limit=limit)
    assert len(f) == len(m)
    n = 0
    for (xf, yf), (xm, ym) in zip(f, m, strict=True):
        assert xf.dtype == torch.float32 and yf.dtype == torch.int64 and yf.dim() == 1
        assert xf.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xf, xm) and torch.equal(yf, ym)
        n += len(yf)
    assert n == (limit or len(load_dataset(dataset, root)[1]))
    # ffcv sets torch's thread count when it builds and runs a loader; the loader restores it.
    assert torch.get_num_threads() == threads


def test_train_epochs_are_seeded_permutations(converted, cifar):
    root, out = converted
    train = cifar[0]
    f = build_loader("ffcv", "cifar10", "train", data_root=out, batch_size=32, seed=1,
                     crop_pad=0, flip=False)
    x0, y0 = batches(f, 0)
    x1, _ = batches(f, 1)
    x0b, y0b = batches(f, 0)

    def rows(x, y):  # each sample as one sortable byte row: pixels then label
        flat = (x * 255).round().to(torch.uint8).contiguous().flatten(1)
        return sorted(map(bytes, torch.cat([flat, y[:, None].to(torch.uint8)], 1).numpy()))

    assert rows(x0, y0) == rows(train.images.float() / 255, train.labels)   # each sample once
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)                    # epoch 0 replays
    assert not torch.equal(x0, x1)                                          # epoch 1 reorders
    assert len(f) == 4
    dropped = build_loader("ffcv", "cifar10", "train", data_root=out, batch_size=32, drop_last=True)
    assert len(dropped) == 3 == len(MemoryLoader(train, 32, True, drop_last=True))


def find_augmentations(aug: torch.Tensor, originals: ImageSet, pad: int):
    """For each augmented image (float [M, C, H, W]) find the original, the content shift
    (sy, sx) in [-pad, pad] (zero fill) and flip that reproduce it exactly.
    Returns int arrays sy, sx, flipped; asserts that every image is found."""
    o = originals.images
    h, w = o.shape[-2:]
    a = (aug * 255).round().to(torch.uint8).contiguous()
    weights = torch.randint(0, 1 << 20, (o[0].numel(),), dtype=torch.int64,
                            generator=torch.Generator().manual_seed(0))
    key = lambda t: (t.flatten(1).long() * weights).sum(1).tolist()   # exact int fingerprint
    table = {}
    padded = torch.nn.functional.pad(o, (pad,) * 4)
    for sy in range(-pad, pad + 1):
        for sx in range(-pad, pad + 1):
            shifted = padded[:, :, pad - sy:pad - sy + h, pad - sx:pad - sx + w]
            for flipped in (0, 1):
                cand = shifted.flip(3) if flipped else shifted
                for i, k in enumerate(key(cand)):
                    table[k] = (sy, sx, flipped, cand[i])
    found = []
    for img, k in zip(a, key(a)):
        assert k in table, "an augmented image is no zero-padded shift/flip of any original"
        sy, sx, flipped, cand = table[k]
        assert torch.equal(img, cand)
        found.append((sy, sx, flipped))
    return map(np.array, zip(*found))


def test_augmentation_statistics_match_memory_loader(aug_loader, cifar):
    train, pad = cifar[0], CIFAR.crop_pad
    mem = MemoryLoader(train, 32, True, seed=5, crop_pad=pad, flip=True)
    stats = {}
    for name, loader in (("ffcv", aug_loader), ("memory", mem)):
        x = torch.cat([batches(loader, e)[0] for e in range(6)])    # 600 augmented samples
        sy, sx, flipped = find_augmentations(x, train, pad)
        stats[name] = (set(sy), set(sx), flipped.mean())
        assert set(sy) == set(sx) == set(range(-pad, pad + 1)), name
        assert 0.4 < flipped.mean() < 0.6, name
    # Seeded augmentation: the same epoch gives the same crops and flips again.
    assert torch.equal(batches(aug_loader, 3)[0], batches(aug_loader, 3)[0])
    assert not torch.equal(batches(aug_loader, 3)[0], batches(aug_loader, 4)[0])


def test_sgd_steps_through_each_loader(aug_loader, cifar):
    mem = MemoryLoader(cifar[0], 32, True, seed=5, crop_pad=4, flip=True)
    for loader in (aug_loader, mem):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(8, 10)).to(memory_format=torch.channels_last)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step, (x, y) in zip(range(3), loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert step == 2
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------
# Bad files and bad commands: one UserError line, before anything is compiled
# ---------------------------------------------------------------------------------------------

def broken_copies(out, folder):
    """Corrupted variants of a good cifar10_test.beton, each in <folder>/<tag>/ next to a good
    cifar10_train.beton (the ffcv loader wants both files of a data set present)."""
    train, test = beton_paths(out, "cifar10")
    data = open(test, "rb").read()
    rng = np.random.default_rng(1)

    def scribble(start, stop):  # random bytes over data[start:stop]
        b = bytearray(data)
        b[start:stop] = rng.bytes(len(b[start:stop]))
        return bytes(b)
    variants = {"empty": b"", "tiny": data[:10], "half": data[:len(data) // 2],
                "no_table_end": data[:-5], "garbage": rng.bytes(5000),
                "garbage_header": scribble(0, 200), "garbage_fields": scribble(24, 1200),
                "garbage_table": scribble(len(data) - 300, len(data))}
    for tag, blob in variants.items():
        os.makedirs(os.path.join(folder, tag))
        shutil.copy(train, os.path.join(folder, tag))
        with open(os.path.join(folder, tag, "cifar10_test.beton"), "wb") as f:
            f.write(blob)
    return list(variants)


def test_corrupted_or_truncated_files_are_one_user_error(converted, tmp_path):
    _, out = converted
    for tag in broken_copies(out, tmp_path):
        with pytest.raises(UserError, match="not a usable FFCV .beton file") as e:
            build_loader("ffcv", "cifar10", "test", data_root=str(tmp_path / tag), batch_size=8)
        assert "\n" not in str(e.value), tag


def test_files_that_do_not_fit_the_dataset_are_refused(converted, tmp_path):
    _, out = converted
    # digits' files under cifar10's names: 8x8x1 images.
    for src, dst in zip(beton_paths(out, "digits"), beton_paths(str(tmp_path), "cifar10")):
        shutil.copy(src, dst)
    with pytest.raises(UserError, match=r"images are 8x8x1 but cifar10 images are 32x32x3"):
        build_loader("ffcv", "cifar10", "train", data_root=str(tmp_path), batch_size=8)
    # CIFAR-sized images with 100 classes, read as cifar10.
    from fastfat.data.ffcv import write_betons
    many = ImageSet(torch.zeros(200, 3, 32, 32, dtype=torch.uint8), torch.arange(200) % 100, 100)
    write_betons([(beton_paths(str(tmp_path), "cifar10")[1], many)])
    with pytest.raises(UserError, match=r"labels span 0..99 but cifar10 has 10 classes"):
        build_loader("ffcv", "cifar10", "test", data_root=str(tmp_path), batch_size=8)


def test_cli_reports_a_bad_file_as_one_line_and_exit_2(converted, tmp_path):
    _, out = converted
    shutil.copy(beton_paths(out, "cifar10")[0], tmp_path)
    with open(beton_paths(str(tmp_path), "cifar10")[1], "wb") as f:
        f.write(open(beton_paths(out, "cifar10")[1], "rb").read()[:5000])
    r = subprocess.run([sys.executable, "-m", "fastfat", "data", "check", "--dataset", "cifar10",
                        "--data-root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfat: error: ")
    assert "cifar10_test.beton: not a usable FFCV .beton file" in lines[0]


def test_convert_refuses_to_overwrite_without_force(converted, capsys):
    root, out = converted
    paths = beton_paths(out, "cifar10")
    before = [os.stat(p).st_mtime_ns for p in paths]
    argv = ["data", "convert", "--dataset", "cifar10", "--data-root", root, "--out", out]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exist" in err[0] and "--force" in err[0]
    assert [os.stat(p).st_mtime_ns for p in paths] == before
    assert cli.main(argv + ["--force"]) == 0
    assert all(os.stat(p).st_mtime_ns != b for p, b in zip(paths, before))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]   # no temp files left


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--dataset", "cifar100"], "cifar100 files missing"),
    (["--dataset", "digits", "--workers", "0"], "--workers must be at least 1"),
])
def test_convert_rejects_bad_input_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = cli.main(["data", "convert", "--data-root", str(tmp_path), "--out", str(out)] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def converted_new_sets(tmp_path_factory):
    """(source root, .beton directory) for small files of the four data sets added with
    issue 22, in their published formats (test_data_files' writers)."""
    from test_data_files import write_fake_mnist, write_fake_stl10, write_fake_svhn
    root = tmp_path_factory.mktemp("new_src")
    out = str(tmp_path_factory.mktemp("new_betons"))
    write_fake_mnist(root, "FashionMNIST")
    write_fake_mnist(root, "MNIST", gz=False, seed=1)
    write_fake_svhn(root)
    write_fake_stl10(root, n_train=12, n_test=6)
    for name in ("fashion-mnist", "mnist", "svhn", "stl10"):
        assert cli.main(["data", "convert", "--dataset", name, "--data-root", str(root), "--out", out]) == 0
    return str(root), out


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist", "svhn", "stl10"])
def test_new_sets_convert_and_serve_the_memory_loaders_test_pixels(converted_new_sets, dataset):
    root, out = converted_new_sets
    assert cli.main(["data", "check", "--dataset", dataset, "--data-root", out]) == 0
    # data check read both files' shapes and labels; the test split's pixels come back exact (one
    # loader per data set: each compiles its own pipeline, seconds apiece)
    f = batches(build_loader("ffcv", dataset, "test", data_root=out, batch_size=8))
    m = batches(build_loader("memory", dataset, "test", data_root=root, batch_size=8))
    assert torch.equal(f[0], m[0]) and torch.equal(f[1], m[1])
