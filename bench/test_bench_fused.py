"""Fused grid points: one fused training step of K members (FAT on Madry, each its own radius,
lambda and seed) against the same K members' unfused steps one after another, in one group, so a
regression of either shows; and a smoke test of `python -m bench.fused --quick`.

Full scale: the demo CNN (digits, width 32, batch 64, PGD-5), K = 4. Small scale (CI, under
--benchmark-disable): width 8, batch 16, PGD-2, K = 2."""
from __future__ import annotations

import json

import pytest

from bench import fused

from .fused import CPU_WORKLOADS, QUICK_WORKLOADS, Pair, member_configs


@pytest.mark.benchmark(group="fused train step: demo CNN, K members")
@pytest.mark.parametrize("impl", ["fused", "one after another"])
def test_fused_train_step(benchmark, scale, impl):
    k = 4 if scale.name == "full" else 2
    workload = CPU_WORKLOADS["demo-cnn"] if scale.name == "full" else QUICK_WORKLOADS["demo-cnn"]
    pair = Pair(member_configs(workload, k, "cpu", "off"), "cpu")
    run = (lambda: pair.fused_steps(1)) if impl == "fused" else (lambda: pair.unfused(1))
    seconds = benchmark.pedantic(run, rounds=scale.rounds, iterations=1, warmup_rounds=1)
    assert seconds > 0
    if benchmark.stats is not None:
        benchmark.extra_info["k"] = k
        benchmark.extra_info["images_per_s"] = round(k * pair.cfgs[0].batch_size / benchmark.stats.stats.median)


def test_bench_fused_quick(capsys, tmp_path):
    """`python -m bench.fused --quick` runs end to end and prints a ratio per K."""
    out_json = tmp_path / "fused.json"
    assert fused.main(["--quick", "--workload", "demo-cnn", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "demo-cnn       K=1 " in out and "demo-cnn       K=2 " in out and out.count("ratio") == 2
    assert [r["k"] for r in json.loads(out_json.read_text())["results"]] == [1, 2]
