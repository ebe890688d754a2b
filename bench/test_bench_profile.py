"""Smoke test of `python -m bench.profile`: each mode runs end to end on a tiny workload and
prints the lines bench/README.md quotes, so the profile cannot rot. Timings mean nothing here."""
from __future__ import annotations

import re

import pytest

from bench import profile

TINY = ["--width", "4", "--batch", "16", "--steps", "2"]


@pytest.mark.parametrize("extra", [[], ["--amp", "bf16"]])
def test_profile_step(capsys, extra):
    assert profile.main(TINY + extra) == 0
    out = capsys.readouterr().out
    assert "fast path " + ("bf16 autocast" if extra else "fp32") in out
    work = re.findall(r"floating-point work: ([\d.]+) GFLOP per step", out)
    assert len(work) == 2 and float(work[0]) < float(work[1])   # the reference does more arithmetic
    assert "attack (PGD)" in out and "conv backward" in out


def test_profile_ablation_and_conv_floor(capsys):
    assert profile.main(TINY + ["--ablation", "--repeats", "1"]) == 0
    assert profile.main(TINY + ["--convs"]) == 0
    out = capsys.readouterr().out
    assert "+ bf16 autocast (bf16 rounding)" in out
    assert re.search(r"float32 +convolutions alone: [\d.]+ s per step .* at most [\d.]+x the reference", out)
