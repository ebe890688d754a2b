"""AutoAttack (aa, apgd) through pyautoattack (--aa-impl pyautoattack, the cross-check) and through
fastfat's own implementation: runs on the BN-folded copy equal pyautoattack's own on the plain model,
are seeded and side-effect free, and `fastfat eval` writes them class by class."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from fastfat import autoattack
from fastfat.autoattack import common
from fastfat.config import make_eval_config, make_train_config
from fastfat.data import MemoryLoader
from fastfat.data.datasets import load_dataset
from fastfat.evaluate import evaluate
from fastfat.models.fold import fold_bn
from fastfat.seeding import eval_noise_seed
from fastfat.train import train

EPS = 0.1   # on this model about a third of the samples survive APGD, so every attack has work


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small digits CNN (with BNs to fold), adversarially trained for a few seconds, its
    checkpoint, and 64 test samples."""
    out = tmp_path_factory.mktemp("aa_run")
    # loader "memory": "auto" imports FFCV to see if it is there, which compiles numba code (~15 s)
    cfg = make_train_config("demo", method="madry", width=8, epochs=4, train_limit=1024,
                            eps_train=0.1, device="cpu", loader="memory")
    model, _ = train(cfg, str(out), progress=False)
    test = load_dataset("digits")[1].subset(64)
    x, y = next(iter(MemoryLoader(test, 64, False)))
    return model.eval(), out / "checkpoint.pt", x, y


def _per_class_diff(a, b, y):
    """How many samples per class the two robust masks disagree on, at most."""
    return torch.bincount(y[a != b], minlength=10).max().item()


def _direct(model, x, y, version, eps, seed, n_iter=100, n_queries=5000):
    """pyautoattack on the plain model, built by its own constructor as its README shows; with
    fewer iterations, its attacks' public parameters set to match."""
    if version == "apgd":
        aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, version="custom",
                        attacks=["apgd-ce", "apgd-t"])
        aa.apgd.n_restarts = 1   # the standard version's setting (custom keeps 5)
    else:
        aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, version="standard")
    aa.verbose = False
    if n_iter != 100:
        kw = dict(n_iter=n_iter, norm="Linf", eps=eps, seed=seed, eot_iter=1, rho=0.75, device="cpu")
        aa.apgd = APGDAttack(model, n_restarts=1, **kw)
        aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_target_classes=9, **kw)
        aa.fab.n_iter = n_iter
    aa.square.n_queries = n_queries
    _, pred = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return pred == y


def test_apgd_in_evaluate_equals_pyautoattack_direct(trained):
    """`apgd` as fastfat eval runs it (standard settings, folded copy, keyed seed) gives the class
    accuracies of pyautoattack's APGD-CE + APGD-T on the plain model: fp32, so within one sample
    per class (the folded copy rounds differently; here they agree exactly)."""
    model, _, x, y = trained
    x, y = x[:32], y[:32]   # the standard 100 + 9 x 100 iterations: a smaller batch for time
    ecfg = make_eval_config(None, attacks=["apgd"], eps_test=[EPS], batch_size=32, seed=5, aa_impl="pyautoattack")
    (clean, rec) = evaluate(model, [(x, y)], ecfg, 10)
    robust = _direct(model, x, y, "apgd", EPS, eval_noise_seed(5, 0, "aa", 0))
    counts = torch.bincount(y, minlength=10).double()
    direct = torch.bincount(y[robust], minlength=10).double() / counts
    assert (torch.tensor(rec["class_acc"]) - direct).abs().mul(counts).max() <= 1 + 1e-9
    assert 0 < rec["avg_acc"] < clean["avg_acc"]
    assert rec["attack_settings"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert rec["attack_settings"]["version"] == "0.2.0" and rec["attack_settings"]["n_iter"] == 100
    assert rec["attack_settings"]["implementation"] == "pyautoattack"


def test_eval_seed_reaches_pyautoattack(trained, monkeypatch):
    """EvalConfig.seed is what pyautoattack draws its starts from: each (batch, eps) cell's
    AutoAttack object carries eval_noise_seed(seed, batch, "aa", eps index) as its seed (the one
    run_standard_evaluation hands to APGD-CE and APGD-T), so another seed gives other seeds; and
    pyautoattack uses it: two seeds start APGD at different points, so their examples differ."""
    import pyautoattack
    model, _, x, y = trained
    seen = []

    def spy(self, x_, y_, batch_size=None):   # record the seeds, skip the (slow) attack itself
        seen.append((self.seed, self.apgd.seed, self.apgd_targeted.seed))
        return x_, model(x_).argmax(1)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    for seed in (5, 6):
        seen.clear()
        ecfg = make_eval_config(None, attacks=["apgd", "aa"], eps_test=[0.05, EPS], batch_size=8, seed=seed,
                                aa_impl="pyautoattack")
        evaluate(model, batches, ecfg, 10)
        want = [eval_noise_seed(seed, b, "aa", i) for b in range(2) for _ in ("apgd", "aa") for i in range(2)]
        assert seen == [(s, s, s) for s in want]
    assert eval_noise_seed(5, 0, "aa", 0) != eval_noise_seed(6, 0, "aa", 0)
    monkeypatch.undo()
    for impl in autoattack.IMPLS:
        runs = [autoattack.run(model, x, y, "apgd", EPS, s, 10, n_iter=2, impl=impl)[0] for s in (5, 6)]
        assert not torch.equal(runs[0], runs[1])


def test_aa_equals_pyautoattack_direct(trained):
    """The whole standard ensemble (iterations and queries cut for time, on both sides alike)
    finds the same robust samples as pyautoattack's standard version on the plain model."""
    model, _, x, y = trained
    ours = autoattack.run(fold_bn(model), x, y, "aa", EPS, 11, 10, n_iter=10, square_n_queries=100,
                          impl="pyautoattack")[1] == y
    theirs = _direct(model, x, y, "aa", EPS, 11, n_iter=10, n_queries=100)
    assert _per_class_diff(ours, theirs, y) <= 1
    assert 0 < ours.sum() < (model(x).argmax(1) == y).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_copy_gives_the_plain_models_results(trained, dtype):
    """On the BN-folded, parameter-frozen copy AutoAttack finds what it finds on the plain model.
    float64: the same samples and the same adversarial examples (the logits pyautoattack sees are
    rounded to fp32 from float64 values that agree to ~1e-15). fp32: within one sample per class."""
    model, _, x, y = trained
    plain = copy.deepcopy(model).to(dtype)
    folded = fold_bn(plain)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0 < \
        sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    kw = dict(n_iter=10, square_n_queries=100, impl="pyautoattack")
    xa, pa = autoattack.run(folded, x.to(dtype), y, "aa", EPS, 3, 10, **kw)
    xb, pb = autoattack.run(plain, x.to(dtype), y, "aa", EPS, 3, 10, **kw)
    if dtype == torch.float64:
        assert torch.equal(pa, pb) and torch.equal(xa, xb)
    else:
        assert _per_class_diff(pa == y, pb == y, y) <= 1


def test_split_over_workers_changes_nothing(trained):
    """The model's forward and backward split over 2 single-threaded workers in slices of 8
    (as fastfat's attacks split theirs): in float64 the same samples and adversarial examples as
    one inline pass."""
    model, _, x, y = trained
    folded = fold_bn(copy.deepcopy(model).double())
    kw = dict(n_iter=10, square_n_queries=50, impl="pyautoattack")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "chunk_size", lambda x: 8)
        xa, pa = autoattack.run(folded, x.double(), y, "aa", EPS, 3, 10, threads=2, **kw)
    xb, pb = autoattack.run(folded, x.double(), y, "aa", EPS, 3, 10, threads=1, **kw)
    assert torch.equal(pa, pb) and torch.equal(xa, xb)


def test_fastfat_aa_on_the_device_agrees_with_the_cpu(trained, device):
    """fastfat's `aa` on the test device (`pytest --device cuda`: APGD without compaction, FAB-T
    and Square dropping rows only every few iterations, Square's 4 queries a round: CUDA's own
    paths, no host sync in their loops) against the CPU's: examples in the ball and the box,
    class-wise robust counts within one sample, verdicts agreeing on >= 95% (short runs in fp32 on
    other hardware round differently). On the CPU it is the same run twice: equal."""
    model, _, x, y = trained
    radii, seeds = [EPS, 0.15], [eval_noise_seed(0, 0, "aa", i) for i in range(2)]
    kw = dict(n_iter=10, square_n_queries=200)
    cpu = autoattack.run_batch(model, x, y, "aa", radii, seeds, 10, **kw)
    dev = autoattack.run_batch(copy.deepcopy(model).to(device), x.to(device), y.to(device), "aa",
                               radii, seeds, 10, **kw)
    assert dev[1].device.type == device.type
    n = len(y)
    for i, e in enumerate(radii):
        rows = slice(i * n, (i + 1) * n)
        a, b = cpu[1][rows] == y, dev[1][rows].cpu() == y
        assert 0 < int(a.sum()) < n                     # every attack of the ensemble had work
        assert _per_class_diff(a, b, y) <= 1 and (a == b).double().mean() >= 0.95
        if device.type == "cpu":
            assert torch.equal(a, b) and torch.equal(cpu[0], dev[0])
        adv = dev[0][rows].cpu()
        assert (adv - x).abs().max() <= e + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_seeded_and_side_effect_free(trained):
    """Same seed, same result; the caller's global RNG stream and the model's parameters (flags
    and .grad) are as before."""
    model, _, x, y = trained
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(123)
    expected = torch.rand(3)
    for impl in autoattack.IMPLS:
        torch.manual_seed(123)
        runs = [autoattack.run(model, x, y, "apgd", EPS, 9, 10, n_iter=10, impl=impl) for _ in range(2)]
        assert torch.equal(torch.rand(3), expected)
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        # the adversarial examples stay in the ball and the box
        x_adv = runs[0][0]
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_settings_record_the_standard_version():
    s = autoattack.settings("aa", 10, "pyautoattack")
    assert s["package"] == "pyautoattack" and s["version"] == "0.2.0"
    ours = autoattack.settings("aa", 10)   # fastfat's, the default: the same parameters
    assert ours["implementation"] == "fastfat" and ours["spec"] == "pyautoattack 0.2.0"
    assert {k: v for k, v in ours.items() if k not in ("implementation", "package", "version", "spec")} == \
        {k: v for k, v in s.items() if k not in ("implementation", "package", "version")}
    with pytest.raises(ValueError):
        autoattack.settings("aa", 10, "foolbox")
    assert s["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (s["n_iter"], s["n_target_classes"], s["square_n_queries"]) == (100, 9, 5000)
    assert autoattack.settings("apgd", 4)["n_target_classes"] == 3   # capped at C - 1
    with pytest.raises(ValueError):
        autoattack.settings("aa", 10, n_restarts=3)


def test_cli_eval_writes_aa_apgd_and_pgd20_class_by_class(trained, tmp_path):
    _, ckpt, _, _ = trained
    r = subprocess.run([sys.executable, "-m", "fastfat", "eval", "--checkpoint", str(ckpt),
                        "--out", str(tmp_path), "--attacks", "aa", "apgd", "pgd20", "--eps-test", "0.3",
                        "--test-limit", "24", "--loader", "memory", "--no-progress"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})   # as conftest: 2 threads thrash
    assert r.returncode == 0, r.stderr
    recs = json.loads((tmp_path / "eval.json").read_text())
    assert [(x["attack"], x["eps"]) for x in recs] == [("clean", 0.0), ("aa", 0.3), ("apgd", 0.3), ("pgd20", 0.3)]
    for x in recs:
        assert len(x["class_acc"]) == 10 and len(x["class_loss"]) == 10
        assert ("attack_settings" in x) == (x["attack"] in ("aa", "apgd"))
        if "attack_settings" in x:   # fastfat's implementation by default
            assert x["attack_settings"]["implementation"] == "fastfat"
    by = {x["attack"]: torch.tensor(x["class_acc"]) for x in recs}
    assert (by["aa"] <= by["apgd"]).all() and (by["apgd"] <= by["clean"]).all()   # apgd is aa's prefix
    assert "AA 0.3" in r.stdout and "APGD 0.3" in r.stdout
