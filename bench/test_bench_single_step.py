"""One training epoch of FAT on Madry with each training attack (PGD-5, PGD-10, FGSM-RS,
N-FGSM) on the ResNet18 benchmark batch: the single-step attacks' throughput beside PGD's
(bench.single_step prints the same side by side with ratios)."""
from __future__ import annotations

import pytest
import torch

from fastfat.train import Trainer

from .common import batch, fat_config, twin_models
from .single_step import ATTACKS


@pytest.mark.benchmark(group="training epoch by attack: ResNet18, FAT-Madry")
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_training_attack_epoch(benchmark, scale, attack):
    over = {**ATTACKS[attack], "co_guard": "off"}
    if scale.name == "small" and attack.startswith("pgd"):
        over["steps"] = 2   # tiny: every code path, in seconds
    cfg = fat_config(width=scale.width, batch_size=scale.batch, **over)
    model, _ = twin_models(cfg)
    trainer = Trainer(cfg, model)
    batches = [batch(scale.batch, seed=s) for s in range(2)]
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

    def epoch():
        g = torch.Generator().manual_seed(0)
        return sum(float(trainer.train_step(x, y, g).loss) for x, y in batches)

    loss = benchmark.pedantic(epoch, rounds=scale.rounds, iterations=1, warmup_rounds=1)
    assert loss == loss and loss > 0   # finite and positive
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(2 * scale.batch / benchmark.stats.stats.median)


def test_quick_command_prints_every_attack(capsys, tmp_path):
    """`python -m bench.single_step --quick` keeps working: every attack of every workload, with
    its ratio to PGD-5 (1 for PGD-5 itself) and its profiled convolution seconds, in the table and
    the JSON."""
    import json

    from bench import single_step

    out = tmp_path / "s.json"
    assert single_step.main(["--quick", "--workload", "demo-cnn", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [r["attack"] for r in rows] == list(ATTACKS)
    assert rows[0]["vs_pgd5"] == 1.0 and all(r["epoch_s"] > 0 for r in rows)
    # the profiler found convolutions in every attack's epoch (no timing is compared here)
    assert all(r["conv_s"] > 0 for r in rows)
    assert rows[0]["conv_bound_vs_pgd5"] == 1.0
    assert "convolutions" in printed
    for a in ATTACKS:
        assert a in printed
