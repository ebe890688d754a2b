import os
import pickle

import numpy as np
import pytest
import torch

from fastfat.data import (MemoryLoader, TorchvisionLoader, augment_batch, build_loader,
                          dataset_info, load_dataset, make_synthetic)
from fastfat.errors import UserError


def write_fake_cifar10(root, n_per_batch=20, seed=0):
    """Files in torchvision's cifar-10-batches-py layout with random pixels; returns the arrays."""
    rng = np.random.RandomState(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.randint(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = rng.randint(0, 10, size=n_per_batch).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        arrays[name] = (x, y)
    return arrays


def test_digits_are_real_and_split_is_fixed():
    tr, te = load_dataset("digits")
    assert tr.images.shape == (1300, 1, 8, 8) and te.images.shape == (497, 1, 8, 8)
    assert tr.images.dtype == torch.uint8 and tr.images.max() == 255
    assert set(tr.labels.tolist()) == set(range(10)) == set(te.labels.tolist())
    tr2, te2 = load_dataset("digits")
    assert torch.equal(tr.images, tr2.images) and torch.equal(te.labels, te2.labels)
    from sklearn.datasets import load_digits
    assert len(tr) + len(te) == len(load_digits().target)


def test_cifar_reads_torchvision_files(tmp_path):
    arrays = write_fake_cifar10(str(tmp_path))
    tr, te = load_dataset("cifar10", str(tmp_path))
    assert tr.images.shape == (100, 3, 32, 32) and te.images.shape == (20, 3, 32, 32)
    x, y = arrays["test_batch"]
    assert torch.equal(te.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert te.labels.tolist() == y


def test_missing_cifar_files_are_named(tmp_path):
    write_fake_cifar10(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3") as e:
        load_dataset("cifar10", str(tmp_path))
    assert "test_batch" not in str(e.value)
    with pytest.raises(UserError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))


def test_corrupt_cifar_file(tmp_path):
    write_fake_cifar10(str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset") as e:
        dataset_info("mnist-9000")
    for known in ("cifar10", "cifar100", "fashion-mnist", "mnist", "svhn", "stl10", "digits"):
        assert known in str(e.value)


def _find_shift(orig, aug, pad):
    """The (dy, dx) such that aug is the zero-padded orig cropped at (dy, dx), or None."""
    h, w = orig.shape[-2:]
    padded = torch.nn.functional.pad(orig, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], aug):
                return dy - pad, dx - pad
    return None


def test_augment_is_random_crop_and_flip():
    tr, _ = make_synthetic(n_train=400)
    x = tr.images
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, 2, True, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    shifts, flips = set(), 0
    for i in range(len(x)):
        s = _find_shift(x[i], out[i], 2)
        if s is None:
            s = _find_shift(x[i], out[i].flip(-1), 2)
            flips += 1
        assert s is not None, "every output is a padded crop of its input, maybe flipped"
        shifts.add(s)
    assert shifts == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert 0.38 < flips / len(x) < 0.62


def test_memory_loader_batches_and_reproducibility():
    tr, te = make_synthetic()
    ld = MemoryLoader(tr, 64, True, seed=3, crop_pad=2, flip=True)
    assert len(ld) == 8  # 500 / 64 rounded up: drop_last is off
    ld.set_epoch(1)
    a = [(x.clone(), y.clone()) for x, y in ld]
    ld.set_epoch(2)
    b = [(x.clone(), y.clone()) for x, y in ld]
    ld.set_epoch(1)
    c = [(x.clone(), y.clone()) for x, y in ld]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, c))
    assert not torch.equal(a[0][1], b[0][1])
    x, y = a[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(y) for _, y in a) == len(tr)
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(tr.labels.tolist())
    test = list(MemoryLoader(te, 64, False))
    assert torch.equal(torch.cat([y for _, y in test]), te.labels)
    assert torch.equal(torch.cat([x for x, _ in test]), te.images.float() / 255)


@pytest.mark.parametrize("train", [True, False])
def test_memory_loader_layout_and_device(train, device):
    """Batches on the loader's device, channels_last by default and contiguous NCHW with
    channels_last=False (the augmented batches too: augment_batch returns channels_last), with
    the same values either way."""
    tr, _ = make_synthetic(n_train=100, n_test=10)
    kw = dict(seed=3, crop_pad=2, flip=True, device=device) if train else dict(device=device)
    last = list(MemoryLoader(tr, 32, train, **kw))
    nchw = list(MemoryLoader(tr, 32, train, channels_last=False, **kw))
    for (a, ya), (b, yb) in zip(last, nchw):
        assert a.device.type == b.device.type == ya.device.type == device.type
        assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
        assert b.is_contiguous()
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_torchvision_loader_matches_memory_on_test_split_and_is_seeded():
    tr, te = make_synthetic(n_train=100, n_test=50)
    mem = torch.cat([x for x, _ in MemoryLoader(te, 16, False)])
    tv = torch.cat([x for x, _ in TorchvisionLoader(te, 16, False)])
    assert torch.equal(mem, tv)
    ld = TorchvisionLoader(tr, 25, True, seed=1, crop_pad=2, flip=True)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = [x for x, _ in ld]
    assert torch.equal(torch.rand(1), before), "the loader leaves the global RNG alone"
    again = [x for x, _ in ld]
    assert all(torch.equal(p, q) for p, q in zip(first, again))


def test_build_loader_limit_and_defaults():
    ld = build_loader("memory", "digits", "train", batch_size=100, limit=250)
    assert len(ld) == 3 and ld.crop_pad == 1 and ld.flip is False
    ld = build_loader("auto", "synthetic", "test", batch_size=100)
    assert isinstance(ld, MemoryLoader) and ld.crop_pad == 0 and not ld.train


def test_class_names_where_given_cover_every_class():
    from fastfat.data import DATASETS
    named = {k: v.classes for k, v in DATASETS.items() if v.classes}
    assert {"cifar10", "fashion-mnist", "stl10"} <= set(named)
    for k, names in named.items():
        assert len(names) == DATASETS[k].num_classes == len(set(names)), k
    assert DATASETS["fashion-mnist"].classes[6] == "shirt"   # label 6 in the published files


def test_report_names_classes_where_the_data_set_does():
    # the report's tables and figures label classes with DatasetInfo.classes, else with the label
    from fastfat.report.labels import class_names, dataset_name
    assert class_names("fashion-mnist", 10)[6] == "shirt" and class_names("cifar10", 10)[0] == "airplane"
    assert class_names("stl10", 10)[7] == "monkey"
    assert class_names("digits", 10) == [str(i) for i in range(10)]
    assert class_names("cifar100", 100)[99] == "99"
    assert dataset_name("fashion-mnist") == "Fashion-MNIST" and dataset_name("stl10") == "STL-10"
