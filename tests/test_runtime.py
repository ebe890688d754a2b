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


def test_guard_cpu_convs_takes_only_the_crashing_shape_on_avx2():
    from fastfat.models import build_model
    model = build_model("resnet18", 10, width=4, in_channels=3).to(memory_format=torch.channels_last)
    assert runtime.guard_cpu_convs(model, "cpu", capability="AVX512") == 0
    assert runtime.guard_cpu_convs(model, "cuda", capability="AVX2") == 0
    ref = build_model("resnet18", 10, width=4, in_channels=3)
    ref.load_state_dict(model.state_dict())
    # width 4: layer2's shortcut (4 -> 8 channels, 1x1, stride 2); layer3's has 8 inputs and runs
    assert runtime.guard_cpu_convs(model, "cpu", capability="AVX2") == 1
    conv = model.layer2[0].shortcut[0]
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    x = torch.rand(8, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model.train()(x)
    assert seen == [True] and conv.weight.stride() == (4, 1, 1, 1)   # NCHW, not channels_last
    torch.testing.assert_close(out, ref.train()(x), rtol=1e-4, atol=1e-5)


def test_a_width_4_resnet_trains_in_channels_last(tmp_path):
    """On an AVX2 CPU this step killed the process (oneDNN's heap corruption) before the guard; in
    a child process, so a crash fails this test instead of ending the run."""
    import subprocess
    import sys
    code = ("import torch; torch.set_num_threads(1)\n"
            "from fastfat.models import build_model\n"
            "from fastfat.runtime import guard_cpu_convs\n"
            "m = build_model('resnet18', 10, width=4, in_channels=3).to(memory_format=torch.channels_last)\n"
            "guard_cpu_convs(m, 'cpu')\n"
            "x = torch.rand(32, 3, 32, 32).to(memory_format=torch.channels_last)\n"
            "for _ in range(3):\n    m(x).square().sum().backward()\n"
            "print('trained')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "trained" in r.stdout, (r.returncode, r.stderr[-500:])
