"""The real Fashion-MNIST files of Debian's dataset-fashion-mnist package: counts, classes, pixel
range, and one short training epoch on a balanced subset. Skipped, with the reason, where the
package is not installed; with CI=true (CI installs it with apt) a missing file fails instead."""
from __future__ import annotations

import os

import pytest
import torch

from fastfat.config import make_train_config
from fastfat.data import load_dataset, mnist
from fastfat.train import train

SYSTEM = mnist.SOURCES["fashion-mnist"][2][0]
IN_CI = os.environ.get("CI", "").lower() == "true"
HAVE = all(mnist._find(SYSTEM))
pytestmark = pytest.mark.skipif(not IN_CI and not HAVE,
                                reason=f"Fashion-MNIST not installed in {SYSTEM} "
                                       f"(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    # an empty data_root: the files must come from the system folder
    return load_dataset("fashion-mnist", str(tmp_path_factory.mktemp("empty_root")))


def test_real_files_counts_classes_and_pixels(fashion):
    tr, te = fashion
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8
    assert torch.bincount(tr.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(te.labels, minlength=10).tolist() == [1000] * 10
    for s in (tr, te):   # the full 0..255 range is used, and images are not blank
        assert int(s.images.min()) == 0 and int(s.images.max()) == 255
        assert float(s.images.float().mean()) > 40   # ~73 for Fashion-MNIST's training set


def test_one_short_epoch_on_a_balanced_subset(tmp_path):
    cfg = make_train_config("demo", dataset="fashion-mnist", data_root=str(tmp_path / "none"), width=8,
                            epochs=1, eps_train=0.1, train_per_class=20, steps=2, batch_size=50)
    model, log = train(cfg, str(tmp_path / "run"), progress=False)
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))
    out = model.eval()(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
