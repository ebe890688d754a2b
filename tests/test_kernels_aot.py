"""Every Triton kernel, compiled without a GPU for sm_80 and sm_90: no compile error, no spills.

The launches come from kernels/aot.py `cases()`, built by the same plan functions the ops call,
one per dtype signature and kernel variant. Needs a process where Triton was imported without
TRITON_INTERPRET=1; otherwise this file runs itself in such a process (see test_kernels_triton.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastfat.kernels import triton_ops as T  # noqa: E402

COMPILING = not isinstance(tl.sum, InterpretedFunction) and not T.INTERPRETED

if COMPILING:
    from fastfat.kernels import aot

    CASES = aot.cases()

    @pytest.fixture(scope="module")
    def compiled():
        """(label, arch) -> (compiled kernel, Resources); compiled lazily, once per case."""
        cache = {}

        def get(label, target):
            key = (label, target.arch)
            if key not in cache:
                k = aot.compile_launch(dict(CASES)[label], target)
                cache[key] = (k, aot.resources(k.asm["cubin"]))
            return cache[key]
        return get

    @pytest.mark.parametrize("target", aot.TARGETS, ids=lambda t: f"sm_{t.arch}")
    @pytest.mark.parametrize("label", [label for label, _ in CASES])
    def test_compiles_without_spills(label, target, compiled):
        k, res = compiled(label, target)
        assert k.asm["cubin"] and f".target sm_{target.arch}" in k.asm["ptx"]
        assert res.stack == 0 and res.local == 0, f"{label} sm_{target.arch} spills: {res}"
        assert 0 < res.registers <= 255

    def test_cases_cover_every_kernel_and_dtype():
        launched = {launch.fn for _, launch in CASES}
        assert launched == set(T.KERNELS)
        for kernel in ("pgd_step", "ce_fwd", "ce_bwd", "class_stats", "cw_fwd", "cw_bwd", "kl_fwd", "kl_bwd"):
            for dt in ("float32", "float16", "bfloat16"):
                assert any(label.startswith(f"{kernel}[{dt}") for label, _ in CASES), (kernel, dt)

    def test_signature_matches_the_launch():
        """The bf16 logits case really compiles a bf16 pointer, per-sample pgd an fp32 vector."""
        cases = dict(CASES)
        src = aot.source(cases["ce_fwd[bfloat16]"])
        assert src.signature["z_ptr"] == "*bf16" and src.signature["y_ptr"] == "*i64"
        src = aot.source(cases["pgd_step[float16,per-sample]"])
        assert src.signature["xa_ptr"] == "*fp16" and src.signature["alpha_ptr"] == "*fp32"
        assert src.constants[(src.fn.arg_names.index("PER_SAMPLE"),)] is True

    def test_cpu_tensors_are_refused_outside_the_interpreter():
        import torch
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            T.cw_margin(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))

else:
    def test_aot_in_compiling_process():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
