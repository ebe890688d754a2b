"""MNIST, Fashion-MNIST, SVHN and STL-10 read from small files made in exactly their published
formats (idx, torchvision's .mat and .bin), where they are looked up, and every kind of bad file
refused in one line; CIFAR batches with labels out of range refused before training. The writers
here are also used by test_ffcv.py and test_data_fashion.py."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fastfat import cli
from fastfat.data import load_dataset, mnist
from fastfat.data.idx import read_idx
from fastfat.errors import UserError


def idx_bytes(arr: np.ndarray) -> bytes:
    """An idx file's bytes: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, the data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fake_mnist(root, folder="FashionMNIST", n_train=40, n_test=20, gz=True, seed=0):
    """The four idx files in torchvision's <root>/<folder>/raw/ layout; returns
    ((train x [N,28,28], y), (test x, y)). Labels cycle through 0..9 so every class is there."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(str(root), folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = os.path.join(raw, f"{split}-{kind}-ubyte")
            data = idx_bytes(arr)
            if gz:
                path, data = path + ".gz", gzip.compress(data)
            with open(path, "wb") as f:
                f.write(data)
        out.append((x, y))
    return out


def write_fake_svhn(root, n_train=30, n_test=20, seed=0):
    """train_32x32.mat / test_32x32.mat as torchvision downloads them (X [32,32,3,N], y [N,1] in
    1..10 with 10 for the digit 0); returns ((x [N,3,32,32], digit), ...)."""
    import scipy.io
    rng = np.random.default_rng(seed)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        digit = np.arange(n) % 10
        scipy.io.savemat(os.path.join(str(root), f"{split}_32x32.mat"),
                         {"X": x.transpose(2, 3, 1, 0), "y": np.where(digit == 0, 10, digit)[:, None].astype(np.uint8)})
        out.append((x, digit))
    return out


def write_fake_stl10(root, n_train=20, n_test=10, seed=0):
    """stl10_binary/{train,test}_{X,y}.bin: images stored column-major, labels 1..10 as bytes."""
    rng = np.random.default_rng(seed)
    base = os.path.join(str(root), "stl10_binary")
    os.makedirs(base, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = np.arange(n) % 10
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(os.path.join(base, f"{split}_X.bin"))
        (y + 1).astype(np.uint8).tofile(os.path.join(base, f"{split}_y.bin"))
        out.append((x, y))
    return out


@pytest.fixture
def no_system_copy(monkeypatch):
    """Hide Debian's Fashion-MNIST folder, so a test sees only what it wrote."""
    monkeypatch.setitem(mnist.SOURCES, "fashion-mnist", ("FashionMNIST", "FashionMNIST", ()))


@pytest.mark.parametrize("name,folder,gz", [("fashion-mnist", "FashionMNIST", True),
                                            ("mnist", "MNIST", False)])
def test_mnist_family_reads_torchvision_layout(tmp_path, no_system_copy, name, folder, gz):
    (xtr, ytr), (xte, yte) = write_fake_mnist(tmp_path, folder, gz=gz)
    tr, te = load_dataset(name, str(tmp_path))
    assert tr.images.shape == (40, 1, 28, 28) and te.images.shape == (20, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert torch.equal(tr.images[:, 0], torch.from_numpy(xtr)) and tr.labels.tolist() == ytr.tolist()
    assert torch.equal(te.images[:, 0], torch.from_numpy(xte)) and te.labels.tolist() == yte.tolist()


def test_missing_mnist_names_both_routes(tmp_path, no_system_copy):
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", str(tmp_path))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    assert "FashionMNIST" in msg and "\n" not in msg
    with pytest.raises(UserError, match="--download"):
        load_dataset("mnist", str(tmp_path))


def test_system_folder_is_used_when_data_root_has_none(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "sys", "x", n_train=30)
    monkeypatch.setitem(mnist.SOURCES, "fashion-mnist",
                        ("FashionMNIST", "FashionMNIST", (str(tmp_path / "sys" / "x" / "raw"),)))
    tr, _ = load_dataset("fashion-mnist", str(tmp_path / "empty"))
    assert len(tr) == 30
    # a copy under data_root comes first
    write_fake_mnist(tmp_path / "mine", n_train=50)
    assert len(load_dataset("fashion-mnist", str(tmp_path / "mine"))[0]) == 50


def test_partial_copy_names_the_missing_file(tmp_path, no_system_copy):
    write_fake_mnist(tmp_path)
    os.remove(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path))


def _raw(tmp_path, name):
    return tmp_path / "FashionMNIST" / "raw" / (name + ".gz")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-7], "holds"),                                     # truncated data
    (lambda b: b + b"\0", "holds"),                                  # trailing bytes
    (lambda b: b"\0\0\x09\x03" + b[4:], "magic number"),             # another element type
    (lambda b: b"PK\x03\x04 a zip, not idx", "magic number"),        # a foreign file
    (lambda b: b[:10], "truncated idx header|holds"),
])
def test_bad_idx_file_is_one_line_naming_it(tmp_path, no_system_copy, damage, message):
    write_fake_mnist(tmp_path)
    path = _raw(tmp_path, "train-images-idx3-ubyte")
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(UserError, match=message) as e:
        load_dataset("fashion-mnist", str(tmp_path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_broken_gzip_stream_is_refused(tmp_path, no_system_copy):
    write_fake_mnist(tmp_path)
    path = _raw(tmp_path, "t10k-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable idx file") as e:
        load_dataset("fashion-mnist", str(tmp_path))
    assert str(path) in str(e.value)


def test_files_that_disagree_are_refused(tmp_path, no_system_copy):
    write_fake_mnist(tmp_path)
    labels = _raw(tmp_path, "train-labels-idx1-ubyte")
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(39, np.uint8))))   # 40 images
    with pytest.raises(UserError, match="40 images but .* 39 labels"):
        load_dataset("fashion-mnist", str(tmp_path))
    labels.write_bytes(gzip.compress(idx_bytes(np.full(40, 10, np.uint8))))
    with pytest.raises(UserError, match="label 10 is outside 0..9"):
        load_dataset("fashion-mnist", str(tmp_path))
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(40, np.uint8))))
    _raw(tmp_path, "train-images-idx3-ubyte").write_bytes(
        gzip.compress(idx_bytes(np.zeros((40, 32, 32), np.uint8))))
    with pytest.raises(UserError, match="32x32, expected 28x28"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_read_idx_plain_and_gzipped_agree(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(str(tmp_path / "a"), 3), arr)
    assert np.array_equal(read_idx(str(tmp_path / "b"), 3), arr)
    with pytest.raises(UserError, match="1 dimension"):
        read_idx(str(tmp_path / "a"), 1)


def test_svhn_reads_torchvision_mat_files_and_maps_10_to_0(tmp_path):
    (xtr, ytr), (xte, yte) = write_fake_svhn(tmp_path)
    tr, te = load_dataset("svhn", str(tmp_path))
    assert tr.images.shape == (30, 3, 32, 32) and te.images.shape == (20, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(xtr)) and tr.labels.tolist() == ytr.tolist()
    assert torch.equal(te.images, torch.from_numpy(xte)) and 0 in te.labels.tolist()


def test_svhn_bad_files(tmp_path):
    with pytest.raises(UserError, match="train_32x32.mat.*--download"):
        load_dataset("svhn", str(tmp_path))
    import scipy.io
    write_fake_svhn(tmp_path)
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"),
                     {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.array([[1], [2], [11], [3]])})
    with pytest.raises(UserError, match="labels must be whole numbers 1..10"):
        load_dataset("svhn", str(tmp_path))
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"),
                     {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(UserError, match="4 images but 3 labels"):
        load_dataset("svhn", str(tmp_path))
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(UserError, match="not an SVHN .mat file"):
        load_dataset("svhn", str(tmp_path))


def test_stl10_reads_torchvision_binary_files(tmp_path):
    (xtr, ytr), (xte, yte) = write_fake_stl10(tmp_path)
    tr, te = load_dataset("stl10", str(tmp_path))
    assert tr.images.shape == (20, 3, 96, 96) and te.images.shape == (10, 3, 96, 96)
    assert torch.equal(tr.images, torch.from_numpy(xtr)) and tr.labels.tolist() == ytr.tolist()
    assert torch.equal(te.images, torch.from_numpy(xte)) and te.labels.tolist() == yte.tolist()


def test_stl10_bad_files(tmp_path):
    with pytest.raises(UserError, match="stl10_binary.*--download"):
        load_dataset("stl10", str(tmp_path))
    write_fake_stl10(tmp_path)
    base = tmp_path / "stl10_binary"
    (base / "test_y.bin").write_bytes(bytes([1] * 9))
    with pytest.raises(UserError, match="10 images but 9 labels"):
        load_dataset("stl10", str(tmp_path))
    (base / "test_y.bin").write_bytes(bytes([0] * 10))
    with pytest.raises(UserError, match="labels must be whole numbers 1..10"):
        load_dataset("stl10", str(tmp_path))
    (base / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="whole number of 3x96x96"):
        load_dataset("stl10", str(tmp_path))


def _cifar_with_labels(root, labels):
    base = os.path.join(str(root), "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    n = len(labels)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8),
                         b"labels": labels if name == "data_batch_2" else [0] * n}, f)


@pytest.mark.parametrize("labels,bad", [([10] + [0] * 39, "10"), ([-1] + [0] * 39, "-1"),
                                        ([-100] * 40, "-100")])
def test_cifar_labels_out_of_range_refused_before_training(tmp_path, capsys, labels, bad):
    """issue 25 item 8: such a batch trained into IndexError (10, -1) or a 'diverged' message
    (all -100, cross-entropy's ignore index); now the file is refused, nothing is trained."""
    _cifar_with_labels(tmp_path / "d", labels)
    with pytest.raises(UserError, match=rf"data_batch_2: not a valid CIFAR batch \(label {bad} "):
        load_dataset("cifar10", str(tmp_path / "d"))
    rc = cli.main(["train", "--dataset", "cifar10", "--model", "cnn", "--width", "4", "--epochs", "1",
                   "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a valid CIFAR batch" in err[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
