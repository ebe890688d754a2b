"""Shared fixtures: tiny, fast configurations for the CPU."""

import pytest
import torch

# One intra-op thread: on a shared 2-core machine two threads per process thrash (seen 20x slower)
# and CPU results are bit-exact only for a fixed thread count.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "ffcv: FFCV data path (numba compile, seconds)")


@pytest.fixture
def tiny_overrides():
    """TrainConfig overrides for a run that takes a second or two on the CPU."""
    return dict(dataset="synthetic", model="resnet18", width=4, epochs=2, batch_size=32,
                steps=2, step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=96,
                test_limit=64, schedule="constant")
