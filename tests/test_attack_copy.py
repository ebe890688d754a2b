"""The public attacks' BN-folded copy (fastfat.models.fold.attack_copy): used for eval-mode models,
reused while the weights are unchanged, refreshed after any change to them, however it is made."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

import fastfat
from fastfat.models import build_model
from fastfat.models import fold
from fastfat.models.fold import attack_copy, fold_bn


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = build_model("cnn", 10, width=8).to(dtype)
    with torch.no_grad():   # BN statistics away from (0, 1), so folding changes the weights
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 16, 16, generator=g).to(dtype), torch.randint(0, 10, (8,), generator=g)


def _same_as_fresh_fold(model):
    """attack_copy(model) holds exactly the weights a fresh fold_bn(model) computes."""
    got, want = attack_copy(model).state_dict(), fold_bn(model).state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_eval_mode_attacks_use_one_cached_copy(monkeypatch):
    model = _model()
    x, y = _batch()
    seen = []
    real = fold.attack_copy
    monkeypatch.setattr(fastfat.attacks, "attack_copy", lambda m, d=None: seen.append(real(m, d)) or seen[-1])
    fastfat.pgd(model, x, y, 8 / 255, 2 / 255, 2)
    fastfat.fgsm(model, x, y, 8 / 255)
    fastfat.PGD(model, steps=2)(x, y)
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and seen[0] is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in seen[0].modules())
    assert not any(p.requires_grad for p in seen[0].parameters())


def test_train_mode_models_and_opt_out_are_attacked_as_they_are():
    model = _model().train()
    x, y = _batch()
    fastfat.pgd(model, x, y, 8 / 255, 2 / 255, 1)
    assert model not in fold._COPIES and model.training
    model.eval()
    fastfat.pgd(model, x, y, 8 / 255, 2 / 255, 1, fold_bn=False)
    assert model not in fold._COPIES
    # a copy fold_bn made (the trainer's), or a model that declares no pairs, is its own copy
    folded = fold_bn(model)
    assert attack_copy(folded) is folded
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10)).eval()
    assert attack_copy(plain) is plain


def test_unchanged_weights_are_not_refolded(monkeypatch):
    model = _model()
    first = attack_copy(model)
    monkeypatch.setattr(fold, "fold_bn", lambda *a, **k: pytest.fail("refolded unchanged weights"))
    assert attack_copy(model) is first
    model(torch.rand(2, 3, 16, 16))   # an eval-mode forward changes nothing
    assert attack_copy(model) is first


@pytest.mark.parametrize("change", ["optimizer_step", "data_write", "load_state_dict",
                                    "bn_statistics", "module_replaced"])
def test_any_weight_change_refreshes_the_copy(change):
    """Every way of changing the weights invalidates the cache; `data_write` (p.data.mul_) bumps
    no tensor version counter, which is why the check compares values."""
    model = _model()
    assert _same_as_fresh_fold(model)
    conv = model.features[0][0]
    if change == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.rand(4, 3, 16, 16)).sum().backward()
        opt.step()
    elif change == "data_write":
        version = conv.weight._version
        conv.weight.data.mul_(1.5)
        assert conv.weight._version == version
    elif change == "load_state_dict":
        other = _model()
        with torch.no_grad():
            other.features[0][0].weight.add_(0.25)
        model.load_state_dict(other.state_dict())
    elif change == "bn_statistics":
        model.train()(torch.rand(4, 3, 16, 16))   # running statistics move
        model.eval()
    else:
        old = conv.weight.clone()
        model.features[0][0] = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                         padding=conv.padding, bias=conv.bias is not None).eval()
        assert not torch.equal(model.features[0][0].weight, old)
    assert _same_as_fresh_fold(model)


def test_folded_attack_equals_the_plain_models_in_float64():
    """The folded copy computes the eval-mode model's function (to ~1e-16 in float64), so the
    attack takes the same signs and lands on the same points; also after a weight change."""
    model = _model(torch.float64)
    x, y = _batch(torch.float64)
    run = lambda fold_bn: fastfat.pgd(model, x, y, 8 / 255, 2 / 255, 5,
                                      generator=torch.Generator().manual_seed(1), fold_bn=fold_bn)
    assert torch.equal(run(True), run(False))
    with torch.no_grad():
        model.features[0][0].weight.mul_(-1)
    assert torch.equal(run(True), run(False))


def test_cache_goes_with_the_model():
    """The cache holds the model weakly: it does not keep a model alive."""
    model = _model()
    attack_copy(model)
    assert model in fold._COPIES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
