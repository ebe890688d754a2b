"""Evaluation: one pass over all eps_test equals the reference's one-at-a-time numbers."""
import importlib.util

import pytest
import torch

from fastfat import reference
from fastfat.config import make_eval_config, make_train_config
from fastfat.data import MemoryLoader, make_synthetic
from fastfat.evaluate import attack_schedule, eps_label, evaluate, table1_row
from fastfat.train import train

# The reference's own data path needs torchvision; a GPU machine may lack it (the same batches).
REF_LOADER = "torchvision" if importlib.util.find_spec("torchvision") else "memory"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, device):
    """A model trained on `device` (the evaluation runs there too: the loaders below put their
    batches on it), and a test set."""
    cfg = make_train_config(None, dataset="synthetic", model="resnet18", width=4, epochs=2,
                            batch_size=32, steps=2, step_size="eps/2", eps_train=8 / 255,
                            lr=0.05, schedule="constant", method="madry", device=str(device))
    model, _ = train(cfg, str(tmp_path_factory.mktemp("run")), progress=False)
    return model.eval(), make_synthetic()[1].subset(96)


def _both(model, test, dtype):
    device = next(model.parameters()).device
    ecfg = make_eval_config(None, attacks=["fgsm", "pgd5", "cw"], eps_test=[8 / 255, 16 / 255],
                            batch_size=32, seed=3, device=str(device))
    batches = [(x.to(dtype), y) for x, y in MemoryLoader(test, 32, False, device=device)]
    fast = evaluate(model.to(dtype), batches, ecfg, 10, device=device)
    ref = reference.ref_evaluate(model, test, attacks=["fgsm", "pgd5", "cw"],
                                 eps_list=[8 / 255, 16 / 255], batch_size=32, seed=3, dtype=dtype,
                                 device=device, loader=REF_LOADER)
    model.float()
    assert [(r["attack"], r["eps"]) for r in fast] == [(r["attack"], r["eps"]) for r in ref]
    return fast, ref


def test_fast_evaluation_equals_reference_in_float64(trained):
    """In float64 the fast path (BN folded, every eps in one batch, channels_last, split over
    workers) and the reference (one eps at a time, NCHW) agree to rounding: no attack step's
    gradient sign is near enough to zero to flip, so class accuracies are equal and class
    losses agree to 1e-12 (eps and step sizes stay float64 all the way to the update)."""
    model, test = trained
    fast, ref = _both(model, test, torch.float64)
    for f, r in zip(fast, ref):
        assert f["class_acc"] == r["class_acc"], (f["attack"], f["eps"])
        assert f["class_loss"] == pytest.approx(r["class_loss"], rel=1e-12, abs=1e-15)


def test_fast_evaluation_equals_reference_in_fp32(trained):
    """In fp32 both sides round differently (folded BN, layouts, and oneDNN picks kernels by CPU
    and batch shape), so a gradient entry near zero can change sign in some attack step and move
    a sample's adversarial example: the numbers may differ by that, not more. Class accuracies
    within one sample per class; class losses within 1% (one moved sample among ~10 per class
    changes its class mean loss by about that on this model)."""
    model, test = trained
    fast, ref = _both(model, test, torch.float32)
    per_class = torch.bincount(test.labels, minlength=10).double()
    for f, r in zip(fast, ref):
        diff = (torch.tensor(f["class_acc"]) - torch.tensor(r["class_acc"])).abs() * per_class
        assert diff.max() <= 1 + 1e-9, (f["attack"], f["eps"], diff)
        assert f["class_loss"] == pytest.approx(r["class_loss"], rel=1e-2, abs=1e-3)
    # robust accuracy falls with eps and under attack
    by = {(r["attack"], r["eps"]): r["avg_acc"] for r in fast}
    assert by[("pgd5", 16 / 255)] <= by[("pgd5", 8 / 255)] <= by[("clean", 0.0)]


def test_records_are_consistent(trained, device):
    model, test = trained
    ecfg = make_eval_config(None, attacks=["pgd3"], eps_test=[0.05], batch_size=40)
    recs = evaluate(model, MemoryLoader(test, 40, False, device=device), ecfg, 10, device=device)
    for r in recs:
        acc = torch.tensor(r["class_acc"], dtype=torch.float64)
        assert len(r["class_acc"]) == 10 and ((acc >= 0) & (acc <= 1)).all()
        assert r["avg_acc"] == pytest.approx(acc.mean().item())
        assert r["vcra"] == pytest.approx(acc.var(unbiased=False).item())
        assert r["worst_acc"] == acc.min().item()
    assert all(r["amp"] == "off" and r["tf32"] is False for r in recs)   # fp32 unless asked, recorded
    # batching does not change the numbers: keyed start noise
    again = evaluate(model, MemoryLoader(test, 40, False, device=device), ecfg, 10, device=device)
    assert again == recs


def test_attack_schedules_are_the_authors():
    assert attack_schedule("fgsm", 0.1) == ("ce", 1, 0.1)
    assert attack_schedule("pgd20", 0.1) == ("ce", 20, 0.025)
    assert attack_schedule("cw", 0.1) == ("cw", 30, 0.025)


def test_table_row_layout():
    recs = [{"attack": "clean", "eps": 0.0, "class_acc": [1.0, 0.5], "avg_acc": 0.75, "vcra": 0.0625,
             "worst_acc": 0.5},
            {"attack": "pgd20", "eps": 16 / 255, "class_acc": [0.4, 0.2], "avg_acc": 0.3, "vcra": 0.01,
             "worst_acc": 0.2}]
    out = table1_row(recs, "madry")
    assert "PGD-20 16/255" in out and "1.00 / 30.00" in out and "6.25 / 75.00" in out
    assert eps_label(8 / 255) == "8/255" and eps_label(0.25) == "0.25" and eps_label(0.2) == "0.2"


def test_per_sample_radii_are_built_once_per_batch_size(trained, device, monkeypatch):
    """The per-sample eps and step tensors (a host-to-device copy each, a sync on CUDA) are
    built once per batch size, not for every batch: batches of 40, 40 and 16."""
    import fastfat.evaluate as E
    model, test = trained
    calls = []
    real = torch.tensor
    monkeypatch.setattr(E.torch, "tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    ecfg = make_eval_config(None, attacks=["fgsm", "pgd2"], eps_test=[8 / 255, 16 / 255], batch_size=32)
    assert len(test) == 96
    evaluate(model, MemoryLoader(test, 40, False, device=device), ecfg, 10, device=device)
    assert len(calls) == 2 * (1 + 2)          # (eps, fgsm step, pgd2 step) x (sizes 40, 16)


def test_evaluation_amp_is_explicit_and_recorded(tmp_path, device):
    """A checkpoint trained under bf16 autocast is evaluated in fp32 unless EvalConfig.amp asks
    otherwise (the paper's protocol); either way every record says which. bf16 evaluation is
    really bf16 (its class losses move)."""
    from fastfat.evaluate import evaluate_checkpoint
    cfg = make_train_config(None, dataset="synthetic", model="cnn", width=4, epochs=1, batch_size=32,
                            steps=1, step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=64,
                            test_limit=32, schedule="constant", amp="bf16", device=str(device))
    train(cfg, str(tmp_path), progress=False)
    over = dict(attacks=["pgd2"], eps_test=[8 / 255], device=str(device), loader="memory")
    fp32, _, ecfg = evaluate_checkpoint(str(tmp_path / "checkpoint.pt"), over, progress=False)
    assert ecfg.amp == "off" and {r["amp"] for r in fp32} == {"off"}
    bf16, _, _ = evaluate_checkpoint(str(tmp_path / "checkpoint.pt"), dict(over, amp="bf16"), progress=False)
    assert {r["amp"] for r in bf16} == {"bf16"}
    assert bf16[0]["class_loss"] != fp32[0]["class_loss"]
