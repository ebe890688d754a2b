"""Model zoo: shapes, aliases, memory formats, known parameter counts, compile capture, BN folding
(exactness in float64, which BNs fold, in-place refresh)."""
import pytest
import torch

from fastfat.errors import UserError
from fastfat.models import ALIASES, MODEL_NAMES, build_model, canonical_model_name, fold_bn

NARROW = {"resnet18": 8, "resnet50": 4, "wrn-32-10": 8, "preactresnet18": 8, "cnn": 8}
# BatchNorm2d modules before / after fold_bn (the structure does not depend on the width).
# Post-activation models fold them all. Pre-activation ones fold each block's bn2 into its conv1
# and keep each block's bn1 and the final BN: PreActResNet18 8 blocks -> 2*8+1 = 17 before, 8+1 = 9
# after; WRN-34-10 3 stages x 5 blocks -> 2*15+1 = 31 before, 15+1 = 16 after.
BN_BEFORE = {"resnet18": 20, "resnet50": 53, "cnn": 3, "preactresnet18": 17, "wrn-32-10": 31}
BN_AFTER = {"resnet18": 0, "resnet50": 0, "cnn": 0, "preactresnet18": 9, "wrn-32-10": 16}
PRE_ACTIVATION = {"preactresnet18": "PreActBlock", "wrn-32-10": "WideBlock"}


def _narrow(name, num_classes=10, in_channels=3, seed=0):
    torch.manual_seed(seed)
    return build_model(name, num_classes, width=NARROW[canonical_model_name(name)],
                       in_channels=in_channels)


def _randomize_bn(model):
    """Non-trivial running stats and affine params, so folding is actually exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("name", list(MODEL_NAMES) + list(ALIASES))
def test_builds_and_forward_shapes(name):
    for in_ch, hw in [(3, 32), (1, 8)]:
        model = _narrow(name, num_classes=7, in_channels=in_ch)
        out = model(torch.rand(2, in_ch, hw, hw))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_aliases_and_case():
    assert canonical_model_name("WRN-34-10") == "wrn-32-10"
    assert canonical_model_name("wrn34-10") == "wrn-32-10"
    assert canonical_model_name("Preact-ResNet18") == "preactresnet18"
    assert canonical_model_name("ResNet18") == "resnet18"
    # an alias builds the very same network as the canonical name
    a, b = _narrow("wrn-34-10"), _narrow("wrn-32-10")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == \
           [(k, v.shape) for k, v in b.state_dict().items()]


def test_unknown_name_and_bad_args():
    with pytest.raises(UserError, match="resnet18.*wrn-32-10"):
        canonical_model_name("vgg16")
    with pytest.raises(UserError):
        build_model("alexnet", 10)
    with pytest.raises(UserError):
        build_model("cnn", 0)
    with pytest.raises(UserError):
        build_model("cnn", 10, width=-1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_matches_nchw(name):
    model = _randomize_bn(_narrow(name)).eval()
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_cl), ref, rtol=1e-4, atol=1e-5)
    model = model.to(memory_format=torch.channels_last)  # weights too, as the trainer does
    torch.testing.assert_close(model(x_cl), ref, rtol=1e-4, atol=1e-5)


def test_known_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(build_model("resnet18", 10)) == 11_173_962
    assert count(build_model("wrn-34-10", 10)) == 46_160_474  # TRADES / RobustBench 46.16M
    assert count(build_model("resnet50", 10)) == 23_520_842


def test_wrn_structure_and_width():
    m = build_model("wrn-32-10", 10)
    assert m.conv1.out_channels == 16
    assert [m.block1[0].conv1.out_channels, m.block2[0].conv1.out_channels,
            m.block3[0].conv1.out_channels] == [160, 320, 640]
    assert len(m.block1) == len(m.block2) == len(m.block3) == 5
    assert (m.bn1.weight == 1).all() and (m.fc.bias == 0).all()
    # He fan-out init: std sqrt(2 / (3*3*160)) for a stage-1 conv
    std = m.block1[1].conv1.weight.std().item()
    assert abs(std - (2 / (9 * 160)) ** 0.5) < 0.05 * std
    assert build_model("wrn-32-10", 10, width=16).conv1.out_channels == 2
    assert build_model("wrn-32-10", 10, width=4).conv1.out_channels == 1


def test_resnet_width_semantics():
    m = build_model("resnet18", 10, width=16, in_channels=1)
    assert m.conv1.in_channels == 1 and m.conv1.out_channels == 16
    assert m.linear.in_features == 128


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fold_bn_matches_eval_and_leaves_original(name):
    model = _randomize_bn(_narrow(name)).train()
    model.zero_grad()
    model(torch.rand(2, 3, 32, 32)).sum().backward()  # the original has grads; copy must not
    before = {k: v.clone() for k, v in model.state_dict().items()}

    folded = fold_bn(model)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not folded.training and not any(m.training for m in folded.modules())
    assert all(not p.requires_grad and p.grad is None for p in folded.parameters())
    ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not ptrs & {t.data_ptr() for t in list(folded.parameters()) + list(folded.buffers())}
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert (n_bn(model), n_bn(folded)) == (BN_BEFORE[name], BN_AFTER[name])

    model.eval()
    for in_ch_x in [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)]:
        x1 = in_ch_x.clone().requires_grad_(True)
        x2 = in_ch_x.clone().requires_grad_(True)
        ref, out = model(x1), folded(x2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(ref)
        (g1,) = torch.autograd.grad((ref * w).sum(), x1)
        (g2,) = torch.autograd.grad((out * w).sum(), x2)
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)


def _logits_and_input_grad(model, x, w):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), g


def _assert_same_function(model, folded, x, tol):
    """Logits and input gradients of `folded` equal `model`'s to tol of their largest magnitude."""
    w = torch.randn(x.shape[0], 10, dtype=x.dtype)
    (ref, g_ref), (out, g_out) = _logits_and_input_grad(model, x, w), _logits_and_input_grad(folded, x, w)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(g_out, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fold_bn_float64_equals_eval_model(name):
    """In float64 folding is the same function up to rounding (~1e-16 relative observed)."""
    model = _randomize_bn(_narrow(name)).double().eval()
    folded = fold_bn(model)
    assert all(t.dtype == torch.float64 for t in folded.parameters())
    for hw in (32, 8):
        _assert_same_function(model, folded, torch.rand(3, 3, hw, hw, dtype=torch.float64), 1e-12)


@pytest.mark.parametrize("name", PRE_ACTIVATION)
def test_fold_bn_pre_activation_folds_bn2_into_conv1(name):
    """Every block's bn2 is gone (conv1 carries it as a bias); its bn1 and the final BN remain."""
    model = _randomize_bn(_narrow(name))
    folded = fold_bn(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == PRE_ACTIVATION[name]]
    assert len(blocks) == {"preactresnet18": 8, "wrn-32-10": 15}[name]
    mods = dict(folded.named_modules())
    final = "bn" if name == "preactresnet18" else "bn1"
    kept = {n for n, m in mods.items() if isinstance(m, torch.nn.BatchNorm2d)}
    assert kept == {f"{b}.bn1" for b in blocks} | {final}
    for b in blocks:
        assert isinstance(mods[f"{b}.bn2"], torch.nn.Identity)
        assert mods[f"{b}.conv1"].bias is not None
        assert model.get_submodule(f"{b}.conv1").bias is None  # the original is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fold_bn_refresh_in_place_tracks_updates(name, dtype):
    """fold_bn(model, out=folded) after a weight and BN-statistics change: the same tensors
    (a compiled copy keeps its graph), bit-equal to a fresh fold, equal to the eval-mode model."""
    model = _randomize_bn(_narrow(name)).to(dtype)
    folded = fold_bn(model)
    tensors = [(n, id(t), t.data_ptr()) for n, t in
               list(folded.named_parameters()) + list(folded.named_buffers())]
    x = torch.rand(2, 3, 32, 32, dtype=dtype)
    stale = folded(x)
    with torch.no_grad():  # an "optimizer step" plus new BN statistics
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _randomize_bn(model)
    assert fold_bn(model, out=folded) is folded
    assert [(n, id(t), t.data_ptr()) for n, t in
            list(folded.named_parameters()) + list(folded.named_buffers())] == tensors
    fresh = fold_bn(model)
    assert folded.state_dict().keys() == fresh.state_dict().keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(folded.state_dict()[k], v), k
    out = folded(x)
    assert not torch.allclose(out, stale)  # the refresh did change something
    torch.testing.assert_close(out, fresh(x), rtol=0, atol=0)
    _assert_same_function(model.eval(), folded, x, 1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_compile_single_graph(name):
    """fullgraph=True fails on any graph break, i.e. data-dependent Python control flow."""
    torch._dynamo.reset()
    model = _randomize_bn(_narrow(name)).eval()
    x = torch.rand(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # capture only: cheap
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(fold_bn(compiled)(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_is_torchs_fuse_conv_bn_map():
    """fold_bn computes torch.nn.utils.fusion.fuse_conv_bn_weights' map: the weight bit for bit,
    the bias to an fp32 ulp (it associates the product differently, see fold._folded)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    from fastfat.models.fold import _folded
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(8, 16, 3, bias=False), torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    w, b = _folded(conv, bn)
    tw, tb = fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                  bn.weight, bn.bias)
    assert torch.equal(w, tw.detach())
    torch.testing.assert_close(b, tb.detach(), rtol=0, atol=4 * torch.finfo(torch.float32).eps * tb.abs().max().item())
    # and the bias is fold's own association, bit for bit: (b - m) * (rsqrt(v + eps) * g) + beta
    with torch.no_grad():
        want = -bn.running_mean * ((bn.running_var + bn.eps).rsqrt() * bn.weight) + bn.bias
    assert torch.equal(b, want)


def _count_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func._overloadpacket.__name__ not in ("view", "detach", "alias")  # no kernel
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def test_fold_refresh_is_batched():
    """The per-step refresh of ResNet18's attack copy dispatches 8 ops plus one per (conv, BN)
    pair (torch._foreach ops over all pairs; on CUDA each is a kernel launch or a few), where a
    pair at a time took 9 per pair (182 for ResNet18's 20 pairs)."""
    model = _randomize_bn(_narrow("resnet18"))
    folded = fold_bn(model)
    pairs = len(model._fold_pairs())
    n = _count_ops(lambda: fold_bn(model, out=folded))
    assert pairs == 20 and n <= pairs + 10, (n, pairs)


@pytest.mark.parametrize("name", ["resnet18", "wrn-32-10"])
def test_fold_in_the_amp_dtype(name):
    """fold_bn(model, dtype=bf16): convs and linear layers stored in bf16 (autocast need not
    re-cast them at each forward), remaining BNs fp32; under bf16 autocast the same logits and
    input gradients bit for bit as the fp32 copy, whose weights autocast rounds the same way;
    a refresh keeps the dtypes and equals a fresh fold."""
    model = _randomize_bn(_narrow(name))
    f32, f16 = fold_bn(model), fold_bn(model, dtype=torch.bfloat16)
    for m in f16.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert m.weight.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16)
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert m.weight.dtype == m.running_var.dtype == torch.float32
    x = torch.rand(2, 3, 16, 16)
    w = torch.randn(2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a, ga), (b, gb) = _logits_and_input_grad(f32, x, w), _logits_and_input_grad(f16, x, w)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert fold_bn(model, out=f16) is f16
    fresh = fold_bn(model, dtype=torch.bfloat16)
    for k, v in fresh.state_dict().items():
        assert v.dtype == f16.state_dict()[k].dtype and torch.equal(f16.state_dict()[k], v), k


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_ch,hw", [(1, 28), (3, 96)])
def test_grey_28_and_colour_96_inputs(name, in_ch, hw):
    """(Fashion-)MNIST's one-channel 28x28 and STL-10's three-channel 96x96: logits of the right
    shape, and the BN-folded attack copy is the eval-mode model (float64: the fold reorders only
    the per-channel affine arithmetic, so 1e-9 of the largest magnitude bounds it)."""
    model = _randomize_bn(_narrow(name, in_channels=in_ch)).double().eval()
    x = torch.rand(2, in_ch, hw, hw, dtype=torch.float64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    _assert_same_function(model, fold_bn(model), x, 1e-9)
