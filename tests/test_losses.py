"""VCAR, FAT, TRADES and FAT-TRADES losses: hand-computed values, gradients, fast == reference.

Hand values are computed here with plain Python arithmetic (math.exp / math.log), not with the
code under test. The fast path is fastfat.losses (on the kernels' torch twins on CPU); the
reference is fastfat.reference (the authors' code shape).
"""
import math

import pytest
import torch

from fastfat import losses
from fastfat.data import superclasses
from fastfat.kernels import CIFAR100_COARSE, CIFAR100_COARSE_AUTHORS, superclass_map
from fastfat.reference import ref_fat_loss, ref_fat_trades_loss, ref_trades_loss, ref_vcar

MODES = ("paper", "authors")


# ---------------------------------------------------------------------------------------------
# plain-arithmetic helpers

def _ce(row, t):
    """Cross-entropy of one row of logits for target t."""
    return math.log(sum(math.exp(v) for v in row)) - row[t]


def _softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def _pop_var(values):
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def _unbiased_var(values):
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def _class_means(loss, y):
    """{class: mean loss} over the classes present, in class order."""
    out = {}
    for c in sorted(set(y)):
        vals = [l for l, t in zip(loss, y) if t == c]
        out[c] = sum(vals) / len(vals)
    return out


def _both_vcar(loss, y, num_classes, mode, superclass=False):
    """(fast, reference) VCAR of python lists."""
    l = torch.tensor(loss, dtype=torch.float32)
    t = torch.tensor(y)
    return (losses.vcar(l, t, num_classes, mode, superclass).item(),
            ref_vcar(l, t, num_classes, mode, superclass).item())


# ---------------------------------------------------------------------------------------------
# CIFAR-100 superclass map

# CIFAR-100's fine labels are indexed in alphabetical order of their names, its 20 coarse labels
# too; the membership table is the one on the data set's page (www.cs.toronto.edu/~kriz/cifar.html).
# torchvision does not ship the coarse mapping (it reads only fine labels), so this table is
# typed in from the data set's documentation.
CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()

CIFAR100_SUPERCLASSES = [  # (coarse name, members), coarse names in alphabetical order
    ("aquatic_mammals", "beaver dolphin otter seal whale"),
    ("fish", "aquarium_fish flatfish ray shark trout"),
    ("flowers", "orchid poppy rose sunflower tulip"),
    ("food_containers", "bottle bowl can cup plate"),
    ("fruit_and_vegetables", "apple mushroom orange pear sweet_pepper"),
    ("household_electrical_devices", "clock keyboard lamp telephone television"),
    ("household_furniture", "bed chair couch table wardrobe"),
    ("insects", "bee beetle butterfly caterpillar cockroach"),
    ("large_carnivores", "bear leopard lion tiger wolf"),
    ("large_man-made_outdoor_things", "bridge castle house road skyscraper"),
    ("large_natural_outdoor_scenes", "cloud forest mountain plain sea"),
    ("large_omnivores_and_herbivores", "camel cattle chimpanzee elephant kangaroo"),
    ("medium_mammals", "fox porcupine possum raccoon skunk"),
    ("non-insect_invertebrates", "crab lobster snail spider worm"),
    ("people", "baby boy girl man woman"),
    ("reptiles", "crocodile dinosaur lizard snake turtle"),
    ("small_mammals", "hamster mouse rabbit shrew squirrel"),
    ("trees", "maple_tree oak_tree palm_tree pine_tree willow_tree"),
    ("vehicles_1", "bicycle bus motorcycle pickup_truck train"),
    ("vehicles_2", "lawn_mower rocket streetcar tank tractor"),
]


def test_cifar100_coarse_map_matches_the_datasets_superclass_table():
    assert len(CIFAR100_FINE_NAMES) == 100 and CIFAR100_FINE_NAMES == sorted(CIFAR100_FINE_NAMES)
    coarse_names = [c for c, _ in CIFAR100_SUPERCLASSES]
    assert coarse_names == sorted(coarse_names)
    expected = {}
    for k, (_, members) in enumerate(CIFAR100_SUPERCLASSES):
        for name in members.split():
            expected[CIFAR100_FINE_NAMES.index(name)] = k
    assert sorted(expected) == list(range(100))
    assert list(CIFAR100_COARSE) == [expected[i] for i in range(100)]
    # five fine classes per superclass: the /5 in the superclass VCAR is an average
    assert all(list(CIFAR100_COARSE).count(k) == 5 for k in range(20))


# ---------------------------------------------------------------------------------------------
# VCAR: hand-computed values

LOSS4 = [1.0, 3.0, 2.0, 6.0]


def test_vcar_all_classes_present_by_hand():
    y = [0, 0, 1, 2]
    means = [2.0, 2.0, 6.0]                    # class 0: (1 + 3) / 2
    paper = _pop_var(means)                    # 32/9
    assert paper == pytest.approx(32 / 9)
    authors = _unbiased_var(means + [0.0] * 97)   # 100 slots, /99
    assert authors == pytest.approx(43 / 99)
    for mode, want in (("paper", paper), ("authors", authors)):
        fast, ref = _both_vcar(LOSS4, y, 3, mode)
        assert fast == pytest.approx(want, rel=1e-6)
        assert ref == pytest.approx(want, rel=1e-6)


def test_vcar_absent_class_by_hand():
    y = [0, 0, 2, 2]                            # class 1 absent
    # paper: only the classes present count: means 2 and 4 -> variance 1
    # authors: the absent class is a 0 in the 100 slots like every slot beyond C
    want = {"paper": 1.0, "authors": (20.0 - 100 * 0.06 ** 2) / 99}   # sum 6, sum of squares 20
    for mode in MODES:
        fast, ref = _both_vcar(LOSS4, y, 3, mode)
        assert fast == pytest.approx(want[mode], rel=1e-6)
        assert ref == pytest.approx(want[mode], rel=1e-6)


def test_vcar_one_class_present_paper_is_zero():
    fast, ref = _both_vcar(LOSS4, [1, 1, 1, 1], 3, "paper")
    assert fast == 0.0 and ref == 0.0
    # authors: one nonzero slot among 100 -> (m^2 - 100 (m/100)^2) / 99 = m^2 / 100
    fast, ref = _both_vcar(LOSS4, [1, 1, 1, 1], 3, "authors")
    assert fast == pytest.approx(3.0 ** 2 / 100, rel=1e-6)
    assert ref == pytest.approx(3.0 ** 2 / 100, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_vcar_authors_cifar10_identity(seed):
    """On CIFAR-10 the authors' term (100 slots, 90 always zero, unbiased) is (10 s2 + 9 m^2) / 99."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(40) % 10
    loss = torch.rand(40, generator=g) * 3
    means = [float(loss[y == c].double().mean()) for c in range(10)]
    s2, m = _pop_var(means), sum(means) / 10
    want = (10 * s2 + 9 * m * m) / 99
    assert losses.vcar(loss, y, 10, "authors").item() == pytest.approx(want, rel=1e-5)
    assert ref_vcar(loss, y, 10, "authors").item() == pytest.approx(want, rel=1e-5)


def test_vcar_superclass_by_hand():
    # fine 4 (beaver) and 30 (dolphin) are in superclass 0, fine 1 (aquarium_fish) in 1
    y = [4, 4, 30, 1]
    loss = [4.0, 6.0, 1.0, 2.0]
    super0 = (5.0 + 1.0) / 5       # class means summed, then / 5
    super1 = 2.0 / 5
    want = {"authors": _unbiased_var([super0, super1] + [0.0] * 18),
            "paper": _pop_var([super0, super1])}
    assert want["paper"] == pytest.approx(0.16)
    for mode in MODES:
        fast, ref = _both_vcar(loss, y, 100, mode, superclass=True)
        assert fast == pytest.approx(want[mode], rel=1e-6)
        assert ref == pytest.approx(want[mode], rel=1e-6)


def test_authors_superclass_map_is_their_json():
    """wzekai99/FAT's cifar100_super_map.json equals CIFAR-100's table except fine 39 (keyboard),
    which it puts in superclass 9 instead of 5."""
    diff = [i for i in range(100) if CIFAR100_COARSE_AUTHORS[i] != CIFAR100_COARSE[i]]
    assert diff == [39] and CIFAR100_COARSE[39] == 5 and CIFAR100_COARSE_AUTHORS[39] == 9
    assert list(CIFAR100_COARSE_AUTHORS).count(9) == 6 and list(CIFAR100_COARSE_AUTHORS).count(5) == 4
    assert superclass_map("authors") == CIFAR100_COARSE_AUTHORS and superclass_map("paper") == CIFAR100_COARSE


def test_the_reference_reads_the_kernels_tables():
    """fastfat.data.superclasses (the reference's tables) is a copy of the kernels' own."""
    assert superclasses.CIFAR100_COARSE == CIFAR100_COARSE
    assert superclasses.CIFAR100_COARSE_AUTHORS == CIFAR100_COARSE_AUTHORS
    from fastfat.reference import losses as reference_losses
    assert reference_losses.CIFAR100_COARSE is superclasses.CIFAR100_COARSE


def test_vcar_superclass_uses_each_modes_map():
    """A loss on fine class 39 lands in superclass 9 in authors mode and in 5 in paper mode."""
    y = [39, 12, 22]          # 12 (bridge) is in superclass 9, 22 (clock) in 5
    loss = [3.0, 1.0, 2.0]
    authors = _unbiased_var([0.0] * 5 + [2.0 / 5] + [0.0] * 3 + [(3.0 + 1.0) / 5] + [0.0] * 10)
    paper = _pop_var([(3.0 + 2.0) / 5, 1.0 / 5])
    assert authors != pytest.approx(_unbiased_var([0.0] * 5 + [5.0 / 5] + [0.0] * 3 + [1.0 / 5] + [0.0] * 10))
    for mode, want in (("authors", authors), ("paper", paper)):
        fast, ref = _both_vcar(loss, y, 100, mode, superclass=True)
        assert fast == pytest.approx(want, rel=1e-6)
        assert ref == pytest.approx(want, rel=1e-6)


def test_superclass_needs_100_classes():
    l, t = torch.ones(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError):
        losses.vcar(l, t, 10, "authors", superclass=True)
    with pytest.raises(ValueError):
        ref_vcar(l, t, 10, "authors", superclass=True)


def test_vcar_unknown_mode():
    l, t = torch.ones(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError):
        losses.vcar(l, t, 10, "median")
    with pytest.raises(ValueError):
        ref_vcar(l, t, 10, "median")


def test_vcar_nan_loss_propagates():
    """A diverged sample must not be silently dropped from the variance."""
    l = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    t = torch.tensor([0, 1, 2, 2])
    for mode in MODES:
        assert math.isnan(losses.vcar(l, t, 3, mode).item())
        assert math.isnan(ref_vcar(l, t, 3, mode).item())


# ---------------------------------------------------------------------------------------------
# VCAR gradients

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("superclass", [False, True])
def test_ref_vcar_gradcheck(mode, superclass):
    c = 100 if superclass else 5
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 1, 3, 3, 3, 4, 30, 55, 55][: 10 if superclass else 7]) % c
    loss = (torch.rand(len(y), generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: ref_vcar(l, y, c, mode, superclass), (loss,))


def test_vcar_paper_gradient_by_hand():
    """d Var / d l_i = 2 (m_c - mu) / (K n_c) for sample i of class c (K classes present)."""
    y = [0, 0, 1, 2]
    means = _class_means(LOSS4, y)
    mu = sum(means.values()) / len(means)
    counts = {c: y.count(c) for c in means}
    want = torch.tensor([2 * (means[t] - mu) / (len(means) * counts[t]) for t in y])
    for fn in (losses.vcar, ref_vcar):
        l = torch.tensor(LOSS4, requires_grad=True)
        fn(l, torch.tensor(y), 3, "paper").backward()
        torch.testing.assert_close(l.grad, want.float(), rtol=1e-6, atol=1e-7)


def test_vcar_authors_gradient_by_hand():
    """Unbiased variance over 100 slots: d/d m_c = 2 (m_c - mean of slots) / 99, / n_c per sample."""
    y = [0, 0, 1, 2]
    means = _class_means(LOSS4, y)
    slot_mean = sum(means.values()) / 100
    want = torch.tensor([2 * (means[t] - slot_mean) / 99 / y.count(t) for t in y])
    for fn in (losses.vcar, ref_vcar):
        l = torch.tensor(LOSS4, requires_grad=True)
        fn(l, torch.tensor(y), 3, "authors").backward()
        torch.testing.assert_close(l.grad, want.float(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# FAT, TRADES, FAT-TRADES: hand-computed values

LOGITS_ADV = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]]
LOGITS_NAT = [[3.0, -0.5, 0.0], [0.0, 2.0, 0.5], [-1.0, 0.0, 2.0], [0.5, 0.0, 0.0]]
Y4 = [0, 1, 2, 0]


def _hand_vcar(loss, y, mode, c):
    means = _class_means(loss, y)
    if mode == "paper":
        return _pop_var(list(means.values()))
    return _unbiased_var([means.get(k, 0.0) for k in range(c)] + [0.0] * (100 - c))


def _hand_trades(beta):
    ce_nat = sum(_ce(r, t) for r, t in zip(LOGITS_NAT, Y4)) / 4
    kl = 0.0
    for a, n in zip(LOGITS_ADV, LOGITS_NAT):
        pa, pn = _softmax(a), _softmax(n)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(pa, pn))
    return ce_nat + beta * kl / 4


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_fat_loss_by_hand(mode):
    ce = [_ce(r, t) for r, t in zip(LOGITS_ADV, Y4)]
    lam = 0.7
    want = sum(ce) / 4 + lam * _hand_vcar(ce, Y4, mode, 3)
    y = torch.tensor(Y4)
    assert losses.fat_loss(_t(LOGITS_ADV), y, 3, lam, mode).item() == pytest.approx(want, rel=1e-6)
    assert ref_fat_loss(_t(LOGITS_ADV), y, 3, lam, mode).item() == pytest.approx(want, rel=1e-6)


def test_fat_loss_lambda_zero_is_mean_ce():
    ce = [_ce(r, t) for r, t in zip(LOGITS_ADV, Y4)]
    y = torch.tensor(Y4)
    for mode in MODES:
        assert losses.fat_loss(_t(LOGITS_ADV), y, 3, 0.0, mode).item() == pytest.approx(sum(ce) / 4, rel=1e-6)


def test_trades_loss_by_hand():
    want = _hand_trades(6.0)
    y = torch.tensor(Y4)
    assert losses.trades_loss(_t(LOGITS_NAT), _t(LOGITS_ADV), y, 6.0).item() == pytest.approx(want, rel=1e-6)
    assert ref_trades_loss(_t(LOGITS_NAT), _t(LOGITS_ADV), y, 6.0).item() == pytest.approx(want, rel=1e-6)


def test_trades_loss_is_ce_when_adv_equals_nat():
    ce_nat = sum(_ce(r, t) for r, t in zip(LOGITS_NAT, Y4)) / 4
    y = torch.tensor(Y4)
    assert losses.trades_loss(_t(LOGITS_NAT), _t(LOGITS_NAT), y, 6.0).item() == pytest.approx(ce_nat, rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_fat_trades_loss_by_hand(mode):
    ce_adv = [_ce(r, t) for r, t in zip(LOGITS_ADV, Y4)]
    beta, lam = 6.0, 0.3
    want = _hand_trades(beta) + lam * _hand_vcar(ce_adv, Y4, mode, 3)
    y = torch.tensor(Y4)
    got_fast = losses.fat_trades_loss(_t(LOGITS_NAT), _t(LOGITS_ADV), y, 3, beta, lam, mode).item()
    got_ref = ref_fat_trades_loss(_t(LOGITS_NAT), _t(LOGITS_ADV), y, 3, beta, lam, mode).item()
    assert got_fast == pytest.approx(want, rel=1e-6)
    assert got_ref == pytest.approx(want, rel=1e-6)


def test_ref_losses_gradcheck():
    """The reference losses are differentiable in both logits (double precision)."""
    g = torch.Generator().manual_seed(5)
    nat = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda a: ref_fat_loss(a, y, 4, 0.5, mode), (adv,))
        assert torch.autograd.gradcheck(
            lambda n, a: ref_fat_trades_loss(n, a, y, 4, 6.0, 0.5, mode), (nat, adv))
    assert torch.autograd.gradcheck(lambda n, a: ref_trades_loss(n, a, y, 6.0), (nat, adv))


# ---------------------------------------------------------------------------------------------
# fast == reference on random data (values and gradients, rtol 1e-5)

CASES = [(10, "paper", False), (10, "authors", False), (100, "paper", False), (100, "authors", False),
         (100, "paper", True), (100, "authors", True)]


def _random_batch(c, seed, n=None):
    g = torch.Generator().manual_seed(seed)
    n = n or (64 if c == 10 else 256)   # C=100 at 256: some classes absent, some repeated
    y = torch.randint(0, c, (n,), generator=g)
    nat = torch.randn(n, c, generator=g) * 2
    adv = nat + torch.randn(n, c, generator=g)
    return nat, adv, y


def _close_grads(a, b):
    scale = max(float(b.abs().max()), 1e-30)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


def _value_and_grads(fn, *tensors):
    ts = [t.clone().requires_grad_() for t in tensors]
    out = fn(*ts)
    grads = torch.autograd.grad(out, ts)
    return out.detach(), grads


@pytest.mark.parametrize("c,mode,superclass", CASES)
def test_vcar_fast_equals_reference(c, mode, superclass):
    _, adv, y = _random_batch(c, 11)
    loss = torch.nn.functional.cross_entropy(adv, y, reduction="none").detach()
    vf, (gf,) = _value_and_grads(lambda l: losses.vcar(l, y, c, mode, superclass), loss)
    vr, (gr,) = _value_and_grads(lambda l: ref_vcar(l, y, c, mode, superclass), loss)
    torch.testing.assert_close(vf, vr, rtol=1e-5, atol=0)
    _close_grads(gf, gr)


@pytest.mark.parametrize("c,mode,superclass", CASES)
def test_fat_loss_fast_equals_reference(c, mode, superclass):
    _, adv, y = _random_batch(c, 12)
    vf, (gf,) = _value_and_grads(lambda a: losses.fat_loss(a, y, c, 2.0, mode, superclass), adv)
    vr, (gr,) = _value_and_grads(lambda a: ref_fat_loss(a, y, c, 2.0, mode, superclass), adv)
    torch.testing.assert_close(vf, vr, rtol=1e-5, atol=0)
    _close_grads(gf, gr)


@pytest.mark.parametrize("c", [10, 100])
def test_trades_loss_fast_equals_reference(c):
    nat, adv, y = _random_batch(c, 13)
    vf, gf = _value_and_grads(lambda n, a: losses.trades_loss(n, a, y, 6.0), nat, adv)
    vr, gr = _value_and_grads(lambda n, a: ref_trades_loss(n, a, y, 6.0), nat, adv)
    torch.testing.assert_close(vf, vr, rtol=1e-5, atol=0)
    for a, b in zip(gf, gr):
        assert b.abs().max() > 0          # natural logits are not detached
        _close_grads(a, b)


@pytest.mark.parametrize("c,mode,superclass", CASES)
def test_fat_trades_loss_fast_equals_reference(c, mode, superclass):
    nat, adv, y = _random_batch(c, 14)
    f = lambda n, a: losses.fat_trades_loss(n, a, y, c, 6.0, 1.5, mode, superclass)  # noqa: E731
    r = lambda n, a: ref_fat_trades_loss(n, a, y, c, 6.0, 1.5, mode, superclass)  # noqa: E731
    vf, gf = _value_and_grads(f, nat, adv)
    vr, gr = _value_and_grads(r, nat, adv)
    torch.testing.assert_close(vf, vr, rtol=1e-5, atol=0)
    for a, b in zip(gf, gr):
        _close_grads(a, b)
