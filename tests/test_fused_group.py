"""train_fused: a fused group's members are their unfused train() runs (files, logs, weights,
evaluation), a diverging member fails alone, and kill -9 + resume equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastfat.config import EvalConfig
from fastfat.config_dict import to_dict
from fastfat.evaluate import evaluate
from fastfat.files import load_checkpoint
from fastfat.fused import split_models
from fastfat.fused.group import FAILED, train_fused
from fastfat.runfiles import load_model
from fastfat.train import NonFiniteLoss, train

from test_fused import MEMBERS, batches, configs, run_both

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "images_per_s")


def group_configs(members=MEMBERS, **over):
    """Tiny runs through the real loaders: 32 synthetic 16x16 images, batches of 16 (2 steps an
    epoch), crop + flip augmentation from each member's seed. loader "memory": "auto" would
    import FFCV to look for it (seconds of numba compilation)."""
    return configs(members, **{**dict(train_limit=32, batch_size=16, epochs=2, loader="memory"), **over})


def rows(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


def assert_near_unfused(model, ref, loss_log, ref_log):
    """fp32 members against their unfused runs, as close as holds on every CPU: grouped and
    single convolutions round differently, and where a rounding flips the sign of an attack
    gradient entry (oneDNN picks kernels by CPU) a few steps move the weights by up to a few
    percent of their scale (the unfused path against itself, channels_last vs NCHW). A member
    fed another stream (batches, augmentation, attack noise, a wrong epoch) is 30-50% off."""
    for k, v in ref.state_dict().items():
        if v.is_floating_point():
            assert (model.state_dict()[k] - v).abs().max() <= 0.05 * v.abs().max() + 1e-6, k
    assert [r["loss"] for r in loss_log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-2)


def test_one_member_is_its_unfused_run_bit_for_bit(tmp_path):
    """K = 1 runs the unfused shapes and code path: the same weights, log and files, bit for bit."""
    (cfg,) = group_configs(MEMBERS[1:2])
    model, log = train(cfg, str(tmp_path / "alone"), progress=False)
    (run,) = train_fused([cfg], [str(tmp_path / "fused")], progress=False)
    assert run.error is None and rows(run.log) == rows(log)
    for k, v in model.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k
    a, b = (load_checkpoint(str(tmp_path / d / "checkpoint.pt")) for d in ("alone", "fused"))
    assert sorted(a) == sorted(b) and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert sorted(os.listdir(tmp_path / "alone")) == sorted(os.listdir(tmp_path / "fused"))


def test_members_are_their_unfused_runs(tmp_path):
    """Three members through the real loop: each member's folder has an unfused run's files, its
    checkpoint loads with load_model, and its log and weights are its train() run's within fp32
    rounding (assert_near_unfused; the loaders, seeds and epoch-keyed streams are each member's
    own). Exactness itself is pinned in float64 (test_fused.py) and by K = 1 above."""
    cfgs = group_configs()
    seen = []
    runs = train_fused(cfgs, [str(tmp_path / f"m{i}") for i in range(3)], progress=False,
                       on_epoch=lambda k, row: seen.append((k, row["epoch"])))
    assert seen == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]
    for i, (cfg, run) in enumerate(zip(cfgs, runs)):
        model, log = train(cfg, str(tmp_path / f"u{i}"), progress=False)
        assert run.error is None and len(run.log) == 2
        assert [r["lr"] for r in run.log] == [r["lr"] for r in log]
        assert_near_unfused(run.model, model, run.log, log)
        assert sorted(os.listdir(tmp_path / f"m{i}")) == sorted(os.listdir(tmp_path / f"u{i}"))
        loaded, saved_cfg = load_model(str(tmp_path / f"m{i}" / "checkpoint.pt"))
        assert to_dict(saved_cfg) == to_dict(cfg)
        assert json.loads((tmp_path / f"m{i}" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_lambda_warmup_and_clipping_follow_each_member(tmp_path):
    """Lambda's warm-up (per member, from its own lambda; the madry member has none) and
    gradient clipping in the real loop: rows with the unfused runs' keys and lambdas, weights
    and losses within fp32 rounding."""
    cfgs = group_configs(lam_warmup_epochs=1, clip_grad_norm=1.0)
    runs = train_fused(cfgs, [str(tmp_path / f"m{i}") for i in range(3)], progress=False)
    for i, (cfg, run) in enumerate(zip(cfgs, runs)):
        model, log = train(cfg, str(tmp_path / f"u{i}"), progress=False)
        assert [sorted(r) for r in run.log] == [sorted(r) for r in log]
        assert [r.get("lam") for r in run.log] == [r.get("lam") for r in log]
        assert_near_unfused(run.model, model, run.log, log)
    assert "lam" not in runs[0].log[0] and runs[1].log[0]["lam"] == pytest.approx(1.0)


def test_evaluation_of_split_members_equals_each_alone():
    """float64, 20 steps: each member split back out of the group and evaluated alone
    (fastfat.evaluate: clean, FGSM and PGD-5 at two radii) has its unfused run's class
    accuracies exactly and its class losses to 1e-9."""
    singles, fused, _, _ = run_both(configs(), 20)
    test = [(x.double(), y) for x, y in batches(1, 2, n=32)[0]]
    ecfg = EvalConfig(attacks=["fgsm", "pgd5"], eps_test=[4 / 255, 8 / 255], seed=3).validate()
    for t, m in zip(singles, split_models(fused.model)):
        alone, split = evaluate(t.model, test, ecfg, 10), evaluate(m, test, ecfg, 10)
        assert [r["class_acc"] for r in split] == [r["class_acc"] for r in alone]
        for a, b in zip(alone, split):
            assert b["class_loss"] == pytest.approx(a["class_loss"], rel=1e-9)


def test_a_diverging_member_fails_alone_and_stays_failed(tmp_path):
    """Member 1's lambda makes its loss non-finite: it fails with the message its unfused run
    raises, keeps no checkpoint of that epoch and records failed.json; the others finish as
    their unfused runs. Resuming reports the failure again without training."""
    members = [dict(MEMBERS[0]), dict(MEMBERS[1], lam=1e38), dict(MEMBERS[2])]
    cfgs = group_configs(members)
    with pytest.raises(NonFiniteLoss) as alone:
        train(cfgs[1], str(tmp_path / "u1"), progress=False)
    dirs = [str(tmp_path / f"m{i}") for i in range(3)]
    failures = []
    runs = train_fused(cfgs, dirs, progress=False, on_failure=lambda k, e: failures.append((k, e)))
    assert failures == [(1, str(alone.value))] and runs[1].error == str(alone.value)
    assert runs[1].model is None and not os.path.exists(os.path.join(dirs[1], "checkpoint.pt"))
    rec = json.loads(Path(dirs[1], FAILED).read_text())
    assert rec["error"] == str(alone.value) and rec["epoch"] == 1
    for i in (0, 2):
        model, log = train(cfgs[i], str(tmp_path / f"u{i}"), progress=False)
        assert runs[i].error is None
        assert_near_unfused(runs[i].model, model, runs[i].log, log)
    again = train_fused(cfgs, dirs, resume=True, progress=False, on_failure=lambda k, e: failures.append((k, e)))
    assert failures[-1] == (1, str(alone.value)) and again[1].error == runs[1].error
    assert all(torch.equal(again[0].model.state_dict()[k], v) for k, v in runs[0].model.state_dict().items())


def test_a_group_whose_members_all_diverge_returns_their_failures(tmp_path):
    cfgs = group_configs([dict(MEMBERS[1], lam=1e38), dict(MEMBERS[2], lam=1e38)], epochs=3)
    runs = train_fused(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    assert all(r.error and "diverged" in r.error and r.model is None and not r.log for r in runs)


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(int(sys.argv[4]))   # the parent's: the attack's split follows it
    from fastfat.config import TrainConfig
    from fastfat.config_dict import from_dict
    from fastfat.fused import group, train as fused_train
    cfgs = [from_dict(TrainConfig, c) for c in json.loads(sys.argv[1])]
    dirs, mode = json.loads(sys.argv[2]), sys.argv[3]

    def stop():
        print("KILL ME", flush=True)
        time.sleep(600)

    if mode == "mid-epoch":   # after the first step of epoch 2
        step, calls = fused_train.FusedTrainer.train_step, [0]
        def train_step(self, *a, **k):
            out = step(self, *a, **k)
            calls[0] += 1
            if calls[0] == 3:
                stop()
            return out
        fused_train.FusedTrainer.train_step = train_step
    else:                     # after member 0's epoch-2 checkpoint, before the others'
        save, calls = group.save_run, [0]
        def save_run(*a, **k):
            save(*a, **k)
            calls[0] += 1
            if calls[0] == len(dirs) + 1:
                stop()
        group.save_run = save_run
    group.train_fused(cfgs, dirs, progress=False)
""")


@pytest.mark.parametrize("mode", ["mid-epoch", "between-checkpoints"])
def test_kill9_and_resume_equals_an_uninterrupted_run(tmp_path, mode):
    """A real process SIGKILLed mid-epoch, or between two members' checkpoint writes (members
    then stand at different epochs: the one ahead rides along unsaved until the others catch up,
    so every member sees the slots of the uninterrupted run), resumes to its results bit for bit."""
    cfgs = group_configs(epochs=3)
    full = train_fused(cfgs, [str(tmp_path / f"full{i}") for i in range(3)], progress=False)
    dirs = [str(tmp_path / f"cut{i}") for i in range(3)]
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps([to_dict(c) for c in cfgs]),
                              json.dumps(dirs), mode, str(torch.get_num_threads())],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "KILL ME"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    epochs = [load_checkpoint(os.path.join(d, "checkpoint.pt"))["epoch"] for d in dirs]
    assert epochs == ([0, 0, 0] if mode == "mid-epoch" else [1, 0, 0])
    resumed = train_fused(cfgs, dirs, resume=True, progress=False)
    for a, b in zip(full, resumed):
        assert rows(a.log) == rows(b.log)
        for k, v in a.model.state_dict().items():
            assert torch.equal(b.model.state_dict()[k], v), k


TRITON_CHILD = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, "tests")
    import fastfat.kernels as K
    from test_fused import assert_members_equal, configs, run_both
    assert K.backend(torch.zeros(1)) == "triton"
    singles, fused, l1, l2 = run_both(configs(), 1, dtype=torch.float32)
    assert l2[0] == __import__("pytest").approx(l1[0], rel=1e-5), (l1, l2)
    assert_members_equal(singles, fused, rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_fused_step_under_the_triton_interpreter():
    """With the Triton kernels (per-sample pgd_step, FAT's CE + class statistics + VCAR) run by
    Triton's interpreter on CPU tensors, one fused step is each member's unfused step within
    the fp32 first-step tolerance."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTFAT_KERNELS="triton")
    out = subprocess.run([sys.executable, "-c", TRITON_CHILD], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-4000:] + out.stderr[-4000:]
