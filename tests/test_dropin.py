"""fastfat.AutoAttack, the drop-in for the AutoAttack authors' class: the same verdicts as
pyautoattack class by class on a model fastfat did not build, the authors' return values and
log, which attack fooled each sample, the model left as it was, and every refusal one ValueError."""
import pytest
import torch
import torch.nn as nn
from pyautoattack import AutoAttack as PyAutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

import fastfat
from fastfat.data.datasets import load_dataset

EPS = 0.1   # about half of the 96 samples stay robust: every attack has work
N_ITER, N_QUERIES = 20, 200   # lowered alike on both sides, to keep the test fast


class UserNet(nn.Module):
    """A user-style model: normalization inside, conv + BatchNorm, no fastfat fold pairs."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), 0.4))
        self.body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16 * 16, num_classes))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


def train_user_net(num_classes=10, epochs=4, seed=0):
    """UserNet naturally trained a few seconds on the digits (8x8, one channel), labels mod
    num_classes; and 96 test samples."""
    torch.manual_seed(seed)
    train, test = load_dataset("digits")
    x, y = train.images.float() / 255, train.labels % num_classes
    model = UserNet(num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test.images[:96].float() / 255, test.labels[:96] % num_classes


@pytest.fixture(scope="module")
def trained():
    return train_user_net()


def lowered(adv):
    """The same lowered settings on either package's object (fastfat's honours them as set)."""
    adv.apgd.n_iter = adv.apgd_targeted.n_iter = adv.fab.n_iter = N_ITER
    adv.square.n_queries = N_QUERIES
    return adv


def pyautoattack_robust(model, x, y, seed=0):
    aa = PyAutoAttack(model, norm="Linf", eps=EPS, seed=seed, version="standard")
    aa.verbose = False
    # pyautoattack's APGD derives its step-size checkpoints in the constructor: rebuild at N_ITER
    kw = dict(n_iter=N_ITER, norm="Linf", eps=EPS, seed=seed, eot_iter=1, rho=0.75, device="cpu")
    aa.apgd = APGDAttack(model, n_restarts=1, **kw)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_target_classes=9, **kw)
    aa.fab.n_iter, aa.square.n_queries = N_ITER, N_QUERIES
    _, pred = aa.run_standard_evaluation(x, y, batch_size=len(y))
    return pred == y


def test_verdicts_agree_with_pyautoattack_class_by_class(trained):
    model, x, y = trained
    adv = lowered(fastfat.AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, verbose=False))
    x_adv = adv.run_standard_evaluation(x, y, bs=250)
    ours, theirs = adv.robust, pyautoattack_robust(model, x, y)
    assert 0.2 < ours.double().mean() < 0.9          # every attack had work: a real comparison
    assert (ours == theirs).double().mean() >= 0.98
    per_class = lambda r: torch.bincount(y[r], minlength=10)
    assert (per_class(ours) - per_class(theirs)).abs().max() <= 1
    assert torch.equal(model(x_adv).argmax(1) == y, ours)


def test_returns_the_authors_values_and_who_fooled_each_sample(trained, capsys):
    model, x, y = trained
    adv = lowered(fastfat.AutoAttack(model, eps=EPS, seed=1))
    x_adv, labels = adv.run_standard_evaluation(x, y, bs=40, return_labels=True)
    out = capsys.readouterr().out
    for line in ("using standard version including apgd-ce, apgd-t, fab-t, square.", "initial accuracy:",
                 "apgd-ce - 1/", "robust accuracy after APGD-CE:", "max Linf perturbation:",
                 "robust accuracy:", "VCRA x10^-2", "worst"):
        assert line in out, line
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(labels, model(x_adv).argmax(1))
    clean_wrong = model(x).argmax(1) != y
    assert clean_wrong.any()
    assert torch.equal(x_adv[clean_wrong], x[clean_wrong])
    by = adv.fooled_by
    assert len(by) == len(y) and set(by) <= {None, "clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    assert [b == "clean" for b in by] == clean_wrong.tolist()
    assert [b is None for b in by] == adv.robust.tolist()
    assert sum(b == "apgd-ce" for b in by) > 0
    robust_rec = adv.records[1]
    assert robust_rec["attack"] == "aa" and robust_rec["eps"] == EPS
    assert sum(c for c in robust_rec["class_count"]) == len(y)
    assert robust_rec["avg_acc"] == pytest.approx(
        sum(a for a in robust_rec["class_acc"] if a is not None) / 10)
    # pyautoattack's spellings: batch_size= returns (x_adv, labels), as its run does
    pair = lowered(fastfat.AutoAttack(model, eps=EPS, seed=1, verbose=False, version="custom",
                                      attacks=["apgd-ce"])).run_standard_evaluation(x, y, batch_size=96)
    assert isinstance(pair, tuple) and len(pair) == 2


def test_model_state_and_grads_are_restored(trained):
    model, x, y = trained
    model.train()
    model(x[:8]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    bn = model.body[1].running_mean.clone()
    model.body[0].weight.requires_grad_(False)
    adv = fastfat.AutoAttack(model, eps=EPS, version="custom", attacks_to_run=["apgd-ce"], seed=0, verbose=False)
    adv.apgd.n_iter, adv.apgd.n_restarts = 5, 1
    adv.run_standard_evaluation(x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(model.body[1].running_mean, bn)
    assert not model.body[0].weight.requires_grad and model.body[0].bias.requires_grad
    model.body[0].weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_individual_and_custom_restarts(trained):
    model, x, y = trained
    adv = fastfat.AutoAttack(model, eps=EPS, version="custom", attacks_to_run=["apgd-ce", "square"],
                             seed=0, verbose=False)
    assert adv.apgd.n_restarts == 5   # the authors' custom default
    adv.apgd.n_iter, adv.apgd.n_restarts, adv.square.n_queries = 5, 2, 50
    res = adv.run_standard_evaluation_individual(x, y, bs=96)
    assert list(res) == ["apgd-ce", "square"] and all(r.shape == x.shape for r in res.values())
    assert adv.attacks_to_run == ["apgd-ce", "square"]


def _tiny(out):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            return out(self.lin(x.flatten(1)))
    return M()


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="L2"), "pyautoattack"), (dict(norm="L1"), "pyautoattack"),
    (dict(version="plus"), "pyautoattack"), (dict(version="rand"), "pyautoattack"),
    (dict(version="custom", attacks_to_run=["apgd-dlr"]), "pyautoattack"),
    (dict(version="custom"), "attacks_to_run"),
    (dict(attacks_to_run=["apgd-ce"]), "version='custom'"),
    (dict(eps=0.0), r"\(0, 1\]"), (dict(eps=8.0), r"\(0, 1\]"),
])
def test_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastfat.AutoAttack(_tiny(lambda z: z), **kwargs)


def test_refused_before_any_attack(trained):
    model, x, y = trained
    adv = fastfat.AutoAttack(model, eps=EPS, verbose=False)
    with pytest.raises(AttributeError, match="n_restart"):
        adv.apgd.n_restart = 2
    adv.apgd.eot_iter = 20
    with pytest.raises(ValueError, match="eot_iter"):
        adv.run_standard_evaluation(x, y)
    adv = fastfat.AutoAttack(model, eps=EPS, verbose=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        adv.run_standard_evaluation(x, y + 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adv.run_standard_evaluation(x * 255, y)
    for bad, match in ((lambda z: z[:, :, None], "logits"), (lambda z: z * float("nan"), "not finite")):
        with pytest.raises(ValueError, match=match):
            fastfat.AutoAttack(_tiny(bad), eps=EPS, verbose=False).run_standard_evaluation(x, y % 10)


def test_few_classes(capsys):
    """n_target_classes capped at C - 1 on a 5-class model; apgd-t refused below 4 classes."""
    model, x, y = train_user_net(num_classes=5, epochs=2)
    adv = lowered(fastfat.AutoAttack(model, eps=EPS, seed=0, verbose=False))
    adv.run_standard_evaluation(x, y)
    assert adv.records[1]["attack_settings"]["apgd-t:n_target_classes"] == 4
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        fastfat.AutoAttack(three, eps=EPS, verbose=False).run_standard_evaluation(x, y % 3)
    ok = fastfat.AutoAttack(three, eps=EPS, verbose=False, version="custom", attacks_to_run=["apgd-ce", "fab-t"])
    ok.apgd.n_iter = ok.fab.n_iter = 3
    ok.run_standard_evaluation(x, y % 3)
