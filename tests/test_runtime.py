"""fastfat.runtime's process-wide CUDA switches and device sync (settable and checkable without a GPU)."""
import torch

from fastfat import runtime


def test_set_backends_sets_cuda_switches_and_restores():
    """For a CUDA device: TF32 (matmul and cuDNN) as asked, explicitly (cuDNN's default is on),
    cudnn.benchmark, and deterministic mode with a cuBLAS workspace config; restore_backends puts
    everything back. For the CPU nothing changes."""
    before = runtime.backend_flags()
    try:
        assert runtime.set_backends("cpu", tf32=True, cudnn_benchmark=True, deterministic=True) == before
        assert runtime.backend_flags() == before
        prev = runtime.set_backends(torch.device("cuda"), tf32=True, cudnn_benchmark=True)
        assert prev == before
        now = runtime.backend_flags()
        assert now["tf32_matmul"] is True and now["tf32_cudnn"] is True and now["cudnn_benchmark"] is True
        runtime.set_backends(torch.device("cuda:0"), tf32=False, deterministic=True)
        now = runtime.backend_flags()
        assert now["tf32_matmul"] is False and now["tf32_cudnn"] is False
        assert now["deterministic_algorithms"] and now["cudnn_deterministic"]
        assert now["cudnn_benchmark"] is False and now["cublas_workspace_config"]
        runtime.set_backends(torch.device("cuda"))                          # None: left as they are
        assert runtime.backend_flags() == now
    finally:
        runtime.restore_backends(before)
    assert runtime.backend_flags() == before


def test_synchronize_is_a_noop_off_cuda():
    runtime.synchronize("cpu")
    runtime.synchronize(torch.device("meta"))
