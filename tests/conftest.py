"""Shared fixtures: tiny, fast configurations, and the device the device-taking tests run on.

`pytest --device cuda` runs the tests that take the `device` fixture (trainer, attacks,
evaluation, loaders, reference) and the CUDA-only ones (tests/test_kernels_cuda.py) on the GPU,
in true fp32 (TF32 off); the other tests say nothing about a device and are deselected, so a
short GPU window is spent on what only a GPU can show. Without a GPU, --device cuda skips them
with the reason. The default, --device cpu, runs everything on the CPU.
"""
import os

import pytest
import torch

# One intra-op thread: on a shared 2-core machine two threads per process thrash (seen 20x slower)
# and CPU results are bit-exact only for a fixed thread count.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the tests taking the `device` fixture run (default cpu); with cuda only "
                          "they and the CUDA-only tests run, the rest are deselected")


def pytest_configure(config):
    config.addinivalue_line("markers", "ffcv: FFCV data path (numba compile, seconds)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run with --device cuda)")
    if config.getoption("--device") == "cuda":
        # read when cuBLAS sets up its workspace: before any test runs, for the deterministic tests
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") != "cuda":
        return
    keep = [i for i in items if "device" in getattr(i, "fixturenames", ()) or i.get_closest_marker("cuda")]
    drop = [i for i in items if i not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    dev = config.getoption("--device")
    if dev != "cuda":
        return f"fastfat test device: {dev}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none available: the tests skip"
    return (f"fastfat test device: cuda ({gpu}); torch {torch.__version__}, tests without a device "
            "deselected")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device a test runs on: --device (cpu by default). CUDA runs check fp32 numbers, so
    TF32 is off for them (cuDNN's default is on)."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but no CUDA device here (torch.cuda.is_available() is False)")
    dev = torch.device(name)
    if dev.type == "cuda":
        from fastfat.runtime import set_backends
        set_backends(dev, tf32=False, cudnn_benchmark=False)
    return dev


@pytest.fixture
def cuda_only(device) -> torch.device:
    """For tests that mean nothing off a GPU: skips unless --device cuda (and a GPU is there)."""
    if device.type != "cuda":
        pytest.skip("CUDA-only: run with --device cuda on a machine with a GPU")
    return device


@pytest.fixture
def tiny_overrides(device):
    """TrainConfig overrides for a run that takes a second or two on the CPU, on `device`."""
    return dict(dataset="synthetic", model="resnet18", width=4, epochs=2, batch_size=32,
                steps=2, step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=96,
                test_limit=64, schedule="constant", device=str(device))


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


@pytest.fixture
def cut_and_resume(tmp_path):
    """cut_and_resume(cfg) -> (full, log_full, resumed, log_resumed): cfg trained whole under
    tmp_path/full, and under tmp_path/cut stopped by an exception after its first epoch (as a
    kill would leave it: the epoch's checkpoint written) and then resumed with --resume."""
    from fastfat.train import train

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    def run(cfg):
        full, log_full = train(cfg, str(tmp_path / "full"), progress=False)
        with pytest.raises(Stop):
            train(cfg, str(tmp_path / "cut"), progress=False, on_epoch=stop)
        resumed, log_resumed = train(cfg, str(tmp_path / "cut"), resume=True, progress=False)
        return full, log_full, resumed, log_resumed
    return run
