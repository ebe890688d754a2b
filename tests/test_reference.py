"""The reference implementation's own sanity: formulas, schedule, seeds, train step, train, evaluate."""
import importlib.util
import math

import pytest
import torch

from fastfat import reference as R
from fastfat import runtime, seeding
from fastfat.config import make_train_config
from fastfat.data import TorchvisionLoader, make_synthetic
from fastfat.models import build_model


def _model(seed=0, width=4, device="cpu"):
    torch.manual_seed(seed)
    return build_model("cnn", 10, width=width).to(device)


def _batch(n=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g).to(device), (torch.arange(n) % 10).to(device)


def _torchvision():
    """The reference's own data path; a GPU machine may not have torchvision installed."""
    pytest.importorskip("torchvision", reason="the reference's TorchvisionLoader needs torchvision")


# ---------------------------------------------------------------------------------------------
# VCAR formulas

@pytest.mark.parametrize("k", [3, 10, 50])
def test_authors_vcar_is_the_padded_unbiased_variance(k):
    """With all K classes present: (K s2 + K m^2 (1 - K/100)) / 99; K = 10 gives (10 s2 + 9 m^2)/99."""
    g = torch.Generator().manual_seed(k)
    y = torch.arange(4 * k) % k
    loss = torch.rand(4 * k, generator=g, dtype=torch.float64) * 2
    means = torch.stack([loss[y == c].mean() for c in range(k)])
    s2, m = float(((means - means.mean()) ** 2).mean()), float(means.mean())
    want = (k * s2 + k * m * m * (1 - k / 100)) / 99
    assert float(R.ref_vcar(loss, y, k, "authors")) == pytest.approx(want, rel=1e-12)
    if k == 10:
        assert want == pytest.approx((10 * s2 + 9 * m * m) / 99, rel=1e-12)
    # paper mode is the population variance s2 itself
    assert float(R.ref_vcar(loss, y, k, "paper")) == pytest.approx(s2, rel=1e-12)


def test_superclass_authors_vcar_uses_twenty_entries():
    """All 100 classes with the same mean m. CIFAR-100's own map (paper mode): five classes per
    superclass, every superclass is m, variance 0. The authors' map puts fine 39 in superclass 9:
    superclass 9 sums six classes (6m/5), superclass 5 four (4m/5), the other 18 are m."""
    y = torch.arange(200) % 100
    m = 1.7
    loss = torch.full((200,), m, dtype=torch.float64)
    assert float(R.ref_vcar(loss, y, 100, "paper", superclass=True)) == pytest.approx(0.0, abs=1e-15)
    supers = [m] * 20
    supers[9], supers[5] = 6 * m / 5, 4 * m / 5
    mean = sum(supers) / 20
    want = sum((v - mean) ** 2 for v in supers) / 19          # torch.var: unbiased, over 20
    assert float(R.ref_vcar(loss, y, 100, "authors", superclass=True)) == pytest.approx(want, rel=1e-12)
    # without superclasses the authors' 100 slots are all 1.7: variance 0 as well
    assert float(R.ref_vcar(loss, y, 100, "authors")) == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule

def test_lr_milestones_120_epochs():
    lr = 0.1
    paper = {0: lr, 59: lr, 60: lr * 0.1, 79: lr * 0.1, 80: lr * 0.01, 119: lr * 0.01}
    # the authors' loop calls adjust_learning_rate(epoch + 1): each drop one 0-based epoch earlier
    authors = {0: lr, 58: lr, 59: lr * 0.1, 88: lr * 0.1, 89: lr * 0.01, 108: lr * 0.01,
               109: lr * 0.005, 119: lr * 0.005}
    for e, want in paper.items():
        assert R.ref_lr(e, 120, lr, "paper") == pytest.approx(want, rel=1e-15)
    for e, want in authors.items():
        assert R.ref_lr(e, 120, lr, "authors") == pytest.approx(want, rel=1e-15)
    assert all(R.ref_lr(e, 120, lr, "constant") == lr for e in range(120))


def test_lr_milestones_round_fractional_epochs():
    # 15 epochs: paper round(7.5) = 8, round(10) = 10; authors 8, round(11.25) = 11,
    # round(13.75) = 14, reached by their epoch + 1, i.e. at 0-based epochs 7, 10 and 13
    assert [R.ref_lr(e, 15, 1.0, "paper") for e in (7, 8, 9, 10)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert [R.ref_lr(e, 15, 1.0, "authors") for e in (6, 7, 9, 10, 12, 13)] == \
        pytest.approx([1, 0.1, 0.1, 0.01, 0.01, 0.005])
    with pytest.raises(ValueError):
        R.ref_lr(0, 10, 0.1, "cosine")


def test_trainer_schedule_matches_reference():
    """The fast trainer's lr_at must give the same rate for every epoch of every run length."""
    train = pytest.importorskip("fastfat.train")
    for schedule in ("paper", "authors", "constant"):
        for epochs in range(1, 241):
            for e in range(epochs):
                assert train.lr_at(e, epochs, 0.1, schedule) == R.ref_lr(e, epochs, 0.1, schedule), \
                    (schedule, epochs, e)


# ---------------------------------------------------------------------------------------------
# Evaluation noise seeds

def test_eval_noise_seed_is_deterministic_distinct_and_in_range():
    attacks = ["fgsm", "cw", "pgd1", "pgd10", "pgd20", "pgd100"]
    seen = {}
    for seed in range(3):
        for b in range(40):
            for a in attacks:
                for e in range(4):
                    s = seeding.eval_noise_seed(seed, b, a, e)
                    assert s == seeding.eval_noise_seed(seed, b, a, e)
                    assert 0 <= s < 2 ** 63
                    assert s not in seen, (seen.get(s), (seed, b, a, e))
                    seen[s] = (seed, b, a, e)
    # fixed values: the function is plain arithmetic, not salted per process
    assert seeding.eval_noise_seed(0, 0, "fgsm", 0) == 1 << 10
    assert seeding.eval_noise_seed(1, 2, "pgd20", 1) == ((1_000_003 + 2) * (1 << 20) + 36) * (1 << 10) + 1
    torch.Generator().manual_seed(seeding.eval_noise_seed(10 ** 9, 10 ** 6, "pgd1000", 1000))  # accepted


def test_eval_noise_seed_rejects_bad_input():
    with pytest.raises(ValueError):
        seeding.eval_noise_seed(0, 0, "autoattack", 0)
    with pytest.raises(ValueError):
        seeding.eval_noise_seed(0, -1, "fgsm", 0)
    with pytest.raises(ValueError):
        seeding.eval_noise_seed(0, 0, "fgsm", 1 << 10)
    with pytest.raises(ValueError):
        seeding.eval_noise_seed(0, 0, "pgd0", 0)
    assert seeding.attack_code("pgd1") != seeding.attack_code("fgsm")


# ---------------------------------------------------------------------------------------------
# Attacks (the reference's own invariants; fast == reference lives in test_attacks.py)

@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_ref_pgd_ball_box_mode(loss, device):
    model = _model(device=device).train()
    x, y = _batch(device=device)
    adv = R.ref_pgd(model, x, y, 0.05, 0.02, 4, loss=loss, generator=torch.Generator(device).manual_seed(0))
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert adv.is_contiguous() and not adv.requires_grad
    assert model.training
    # the authors' shape: the attack's backward filled the parameter grads
    assert all(p.grad is not None for p in model.parameters())


def test_ref_pgd_works_under_no_grad():
    model = _model().eval()
    x, y = _batch()
    with torch.no_grad():
        adv = R.ref_pgd(model, x, y, 0.05, 0.02, 2, generator=torch.Generator().manual_seed(0))
    assert (adv != x).any()


def test_ref_cwloss_by_hand():
    out = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    y = torch.tensor([0, 2])
    # sample 0: -(3 - 2.5 + kappa), sample 1: -(1 - 4 + kappa); with kappa 0.4 the second clamps to 0
    assert float(R.ref_cwloss(out, y, 50.0)) == pytest.approx(-(0.5 + 50) - (-3 + 50))
    assert float(R.ref_cwloss(out, y, 0.4)) == pytest.approx(-(0.5 + 0.4))


# ---------------------------------------------------------------------------------------------
# Train step

STEP_KW = dict(eps=8 / 255, alpha=2 / 255, steps=3, lam=1.0, beta=6.0, mode="paper",
               superclass=False, num_classes=10)


def _step(method, seed=0, device="cpu", **kw):
    model = _model(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    x, y = _batch(seed=seed, device=device)
    g = torch.Generator(device).manual_seed(5)
    args = {**STEP_KW, **kw}
    loss = R.ref_train_step(model, opt, x, y, method=method, generator=g, **args)
    return model, loss, g


@pytest.mark.parametrize("method", R.METHODS)
def test_train_step_runs_and_updates(method, device):
    init = _model(device=device).state_dict()
    model, loss, _ = _step(method, device=device)
    assert isinstance(loss, float) and math.isfinite(loss) and loss > 0
    assert model.training
    sd = model.state_dict()
    assert any(not torch.equal(init[k], sd[k]) for k in init if "weight" in k)


def test_train_step_lambda_zero_reduces_to_base_method():
    # Equal math, not equal bits: nn.CrossEntropyLoss's mean and FAT's mean of per-sample CE sum
    # in another order on some CPUs (1 ulp apart on an AVX2-only EPYC), so to fp32 rounding.
    for base, fat, kw in (("madry", "fat-madry", {}), ("trades", "fat-trades", {"attack_loss": "ce"})):
        a, la, _ = _step(base, **kw)
        b, lb, _ = _step(fat, lam=0.0, **kw)
        assert lb == pytest.approx(la, rel=1e-6)
        torch.testing.assert_close(b.state_dict(), a.state_dict(), rtol=1e-5, atol=1e-6)


def test_train_step_attack_noise_comes_from_the_generator():
    _, _, g_nat = _step("natural")
    _, _, g_adv = _step("madry")
    fresh = torch.Generator().manual_seed(5)
    assert torch.equal(g_nat.get_state(), fresh.get_state())        # natural draws nothing
    assert not torch.equal(g_adv.get_state(), fresh.get_state())    # the attack start did
    # same generator state -> same step
    a, la, _ = _step("fat-madry", mode="authors")
    b, lb, _ = _step("fat-madry", mode="authors")
    assert la == lb and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_trades_default_attack_is_kl():
    a, la, _ = _step("trades")
    b, lb, _ = _step("trades", attack_loss="kl")
    c, lc, _ = _step("trades", attack_loss="ce")
    assert la == lb and la != lc


# ---------------------------------------------------------------------------------------------
# Train and evaluate

def _cfg(**kw):
    base = dict(method="fat-madry", model="cnn", width=4, dataset="synthetic", eps_train=8 / 255,
                steps=2, step_size="eps/4", lam=0.5, epochs=2, batch_size=32, train_limit=64,
                lr=0.05, schedule="paper", loader="torchvision", seed=3)
    base.update(kw)
    return make_train_config(**base)


def test_ref_train_is_deterministic_and_trains(device):
    """On the model's device (batches and attack noise there too); on CUDA in deterministic mode,
    as cuDNN's weight gradients are not otherwise."""
    _torchvision()
    tr, _ = make_synthetic(n_train=64, n_test=16, seed=0)
    cfg = _cfg()
    init = _model(width=4, device=device).state_dict()
    flags = runtime.set_backends(device, deterministic=True)
    try:
        a = R.ref_train(cfg, tr, _model(width=4, device=device))
        b = R.ref_train(cfg, tr, _model(width=4, device=device))
        # max_steps: 4 steps is the whole run (2 epochs x 64/32), 1 step is not
        c = R.ref_train(cfg, tr, _model(width=4, device=device), max_steps=4)
        d = R.ref_train(cfg, tr, _model(width=4, device=device), max_steps=1)
    finally:
        runtime.restore_backends(flags)
    assert next(a.parameters()).device == device
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(init[k], v) for k, v in a.state_dict().items() if "weight" in k)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, d.state_dict()[k]) for k, v in a.state_dict().items())


def _one_step_on(data, cfg):
    """A fresh model after ref_train_step on the first batch of a TorchvisionLoader over data, with
    epoch 0's attack generator: what ref_train's first step must equal."""
    from fastfat.seeding import epoch_generator

    model = _model(width=4)
    loader = TorchvisionLoader(data, cfg.batch_size, True, seed=cfg.seed, crop_pad=2, flip=True)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    R.ref_train_step(model, opt, x, y, method=cfg.method, eps=cfg.eps_train, alpha=cfg.alpha(),
                     steps=cfg.steps, lam=cfg.lam, beta=cfg.beta, mode=cfg.vcar_mode, superclass=False,
                     num_classes=10, generator=epoch_generator(cfg.seed, 0, "cpu", "attack"))
    return model


def _same(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_ref_train_first_step_is_ref_train_step():
    """One step of ref_train = the loader's first batch + ref_train_step with epoch 0's generator."""
    tr, _ = make_synthetic(n_train=64, n_test=16, seed=0)
    cfg = _cfg(method="fat-trades", vcar_mode="authors")
    a = R.ref_train(cfg, tr, _model(width=4), max_steps=1)
    assert _same(a, _one_step_on(tr.subset(cfg.train_limit), cfg))


def test_ref_train_draws_the_balanced_pool_as_the_fast_trainer_does():
    """train_per_class: ref_train's first step is the first batch of balanced_pool's pool; with
    val_per_class, of that pool less the hold-out (data.split.split_training_set's split)."""
    from fastfat.data.split import balanced_pool, stratified_holdout

    tr, _ = make_synthetic(n_train=200, n_test=16, seed=0)
    cfg = _cfg(train_limit=None, train_per_class=5)
    pool = balanced_pool(tr, 5, cfg.seed)
    assert pool.labels.bincount().tolist() == [5] * 10
    a = R.ref_train(cfg, tr, _model(width=4), max_steps=1)
    assert _same(a, _one_step_on(pool, cfg))
    # and not the first 50 images' batch: the pool is what it trained on
    assert not _same(a, R.ref_train(_cfg(train_limit=50), tr, _model(width=4), max_steps=1))
    cfg = _cfg(train_limit=None, train_per_class=5, val_per_class=2)
    rest = stratified_holdout(pool, 2, cfg.seed)[0]
    assert rest.labels.bincount().tolist() == [3] * 10
    assert _same(R.ref_train(cfg, tr, _model(width=4), max_steps=1), _one_step_on(rest, cfg))


def test_ref_train_raises_on_divergence():
    tr, _ = make_synthetic(n_train=64, n_test=16, seed=0)
    with pytest.raises(FloatingPointError):
        R.ref_train(_cfg(method="natural", lr=1e30, epochs=3), tr, _model(width=4))


@pytest.mark.parametrize("loader", ["torchvision", "memory"])
def test_ref_evaluate_records(loader, device):
    """Records on the model's device; the "memory" loader (for machines without torchvision)
    serves the same batches, so the same records."""
    _, te = make_synthetic(n_train=16, n_test=40, seed=1)
    model = _model(device=device).eval()
    eps_list = [0.03, 0.06]
    kw = dict(attacks=["fgsm", "pgd3", "cw"], eps_list=eps_list, batch_size=16, seed=2)
    recs = R.ref_evaluate(model, te, loader=loader, **kw)
    if loader == "memory" and importlib.util.find_spec("torchvision"):
        other = R.ref_evaluate(model, te, loader="torchvision", **kw)
        assert other == recs or all(_same_record(a, b) for a, b in zip(other, recs))
    elif loader == "torchvision":
        _torchvision()
    assert [(r["attack"], r["eps"]) for r in recs] == [("clean", 0.0)] + [
        (a, e) for a in ("fgsm", "pgd3", "cw") for e in eps_list]
    for r in recs:
        assert set(r) == {"attack", "eps", "class_acc", "avg_acc", "vcra", "worst_acc", "class_loss"}
        assert len(r["class_acc"]) == 10 and len(r["class_loss"]) == 10
        assert r["avg_acc"] == pytest.approx(sum(r["class_acc"]) / 10)
        assert r["worst_acc"] == min(r["class_acc"])
    # clean accuracy by hand
    x, y = (te.images.float() / 255).to(device), te.labels.to(device)
    with torch.no_grad():
        pred = model(x).argmax(1)
    for c in range(10):
        assert recs[0]["class_acc"][c] == float((pred[y == c] == c).sum()) / int((y == c).sum())
    # deterministic
    again = R.ref_evaluate(model, te, loader=loader, **kw)
    assert again == recs or all(_same_record(a, b) for a, b in zip(again, recs))


def _same_record(a, b):
    return all((a[k] == b[k]) or (isinstance(a[k], list) and all(
        (u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(a[k], b[k]))) for k in a)


def test_ref_evaluate_start_noise_follows_eval_noise_seed():
    """The fgsm record at eps index 1 equals attacking each batch by hand with the generator
    seeded by eval_noise_seed(seed, batch, "fgsm", 1)."""
    _, te = make_synthetic(n_train=16, n_test=40, seed=1)
    model = _model().eval()
    eps_list, seed = [0.03, 0.1], 7
    recs = R.ref_evaluate(model, te, attacks=["fgsm"], eps_list=eps_list, batch_size=16, seed=seed)
    preds, ys = [], []
    for b, (x, y) in enumerate(TorchvisionLoader(te, 16, False)):
        g = torch.Generator().manual_seed(seeding.eval_noise_seed(seed, b, "fgsm", 1))
        adv = R.ref_fgsm(model, x, y, 0.1, generator=g)
        with torch.no_grad():
            preds.append(model(adv).argmax(1))
        ys.append(y)
    want = R.ref_class_accuracy(torch.cat(preds), torch.cat(ys), 10)
    assert recs[2]["attack"] == "fgsm" and recs[2]["eps"] == 0.1
    assert _same_record({"a": recs[2]["class_acc"]}, {"a": want})
