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


# Ops that make the host wait for a CUDA device (they size an output from, or read, device
# values). A CPU run cannot observe a sync, but it can see these ops being called.
SYNCING_OPS = ("bincount", "_local_scalar_dense", "item", "nonzero", "unique", "masked_select",
               "repeat_interleave", "histc")


@pytest.fixture
def syncing_ops():
    """syncing_ops(fn, *args) -> the names of SYNCING_OPS that fn(*args) calls (aten level)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in SYNCING_OPS:
                self.seen.add(name)
            return func(*args, **(kwargs or {}))

    def run(fn, *args, **kwargs):
        with Record() as rec:
            fn(*args, **kwargs)
        return rec.seen
    return run
