"""The trainer: pinned to the reference, exact resume, divergence caught, schedules."""
import copy
import warnings

import pytest
import torch

from fastfat import reference, runtime
from fastfat.config import make_train_config
from fastfat.data import MemoryLoader, make_synthetic
from fastfat.errors import UserError
from fastfat.runfiles import build_for_config
from fastfat.train import NonFiniteLoss, Trainer, lr_at, train


@pytest.mark.parametrize("method,extra", [
    ("madry", {}),
    ("fat-madry", dict(lam=1.0, vcar_mode="paper")),
    ("fat-madry", dict(lam=1.0, vcar_mode="authors")),
    ("trades", dict(beta=6.0)),
    ("fat-trades", dict(lam=1.0, beta=6.0, vcar_mode="authors")),
    ("natural", dict(eps_train=0.0)),
])
def test_twenty_steps_match_the_reference(method, extra, device):
    """Same init, same batches, same attack starts: the fast trainer (channels_last, BN folded
    for the attack, input gradients only) ends 20 SGD steps with the reference's weights.

    In float64: the attack uses sign(grad), so in fp32 the last-bit differences between a
    channels_last, BN-folded forward and the reference's NCHW one flip the sign of near-zero
    gradient entries, and those flips grow into visibly different training runs within a few
    steps (see test_first_step_matches_in_fp32). float64 pins the same math without the chaos."""
    base = dict(dataset="synthetic", model="resnet18", width=4, steps=3, step_size="eps/2",
                eps_train=8 / 255, lr=0.05, method=method)
    cfg = make_train_config(None, **{**base, **extra})
    tr, _ = make_synthetic(n_train=320)
    fast_model = build_for_config(cfg, device).double()
    ref_model = copy.deepcopy(fast_model).to(memory_format=torch.contiguous_format)
    trainer = Trainer(cfg, fast_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    batches = [(x.double(), y) for x, y in list(MemoryLoader(tr, 16, False, device=device))[:20]]
    g_fast, g_ref = (torch.Generator(device=device).manual_seed(5) for _ in range(2))
    for x, y in batches:
        out = trainer.train_step(x.contiguous(memory_format=torch.channels_last), y, g_fast)
        ref_loss = reference.ref_train_step(
            ref_model, ref_opt, x.contiguous(), y, method=method, eps=cfg.eps_train,
            alpha=cfg.alpha(), steps=cfg.steps, lam=cfg.lam, beta=cfg.beta, mode=cfg.vcar_mode,
            num_classes=10, generator=g_ref)
        assert float(out.loss) == pytest.approx(ref_loss, rel=1e-4)
    fast_sd, ref_sd = fast_model.state_dict(), ref_model.state_dict()
    for k in ref_sd:
        if ref_sd[k].is_floating_point():
            torch.testing.assert_close(fast_sd[k], ref_sd[k], rtol=1e-4, atol=1e-6, msg=k)
        else:
            assert torch.equal(fast_sd[k], ref_sd[k]), k
    # the weights really moved, so the comparison above means something
    init = build_for_config(cfg, device).state_dict()
    assert not torch.allclose(init["linear.weight"].double(), fast_sd["linear.weight"])


@pytest.mark.parametrize("method", ["madry", "fat-madry", "fat-trades"])
def test_first_step_matches_in_fp32(method, device):
    """fp32, the production dtype: one step from the same state gives the reference's loss and
    weights (rtol 1e-5 on the loss, 1e-4 on the weights). TRADES' KL attack is left to the
    float64 test: its first gradient, softmax(adv) - softmax(nat) at x_adv ~ x, is a
    cancellation whose signs the layout's last bits decide."""
    cfg = make_train_config(None, dataset="synthetic", model="resnet18", width=4, steps=3,
                            step_size="eps/2", eps_train=8 / 255, lr=0.05, method=method, lam=1.0)
    tr, _ = make_synthetic(n_train=64)
    fast_model = build_for_config(cfg, device)
    ref_model = copy.deepcopy(fast_model).to(memory_format=torch.contiguous_format)
    trainer = Trainer(cfg, fast_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    x, y = next(iter(MemoryLoader(tr, 32, False, device=device)))
    out = trainer.train_step(x, y, torch.Generator(device=device).manual_seed(1))
    ref_loss = reference.ref_train_step(ref_model, ref_opt, x.contiguous(), y, method=method,
                                        eps=cfg.eps_train, alpha=cfg.alpha(), steps=cfg.steps,
                                        lam=cfg.lam, beta=cfg.beta, mode=cfg.vcar_mode, num_classes=10,
                                        generator=torch.Generator(device=device).manual_seed(1))
    assert float(out.loss) == pytest.approx(ref_loss, rel=1e-5)
    for k, v in ref_model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fast_model.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_amp_on_the_cpu():
    """--amp bf16 on the CPU: the attack and the training forward run under bf16 autocast (the
    loss moves off the fp32 reference's, so autocast really took effect) and stay within bf16's
    rounding of it; in float64 autocast does not apply and the step is the fp32 path's math."""
    over = dict(dataset="synthetic", model="resnet18", width=4, steps=3, step_size="eps/2",
                eps_train=8 / 255, lr=0.05, method="fat-madry", lam=1.0)
    cfg, cfg16 = make_train_config(None, **over), make_train_config(None, amp="bf16", **over)
    tr, _ = make_synthetic(n_train=64)
    x, y = next(iter(MemoryLoader(tr, 32, False)))
    losses = {}
    for name, c, dtype in (("fp32", cfg, torch.float32), ("bf16", cfg16, torch.float32),
                           ("fp64", cfg, torch.float64), ("bf16 on fp64", cfg16, torch.float64)):
        trainer = Trainer(c, build_for_config(c, "cpu").to(dtype))
        losses[name] = float(trainer.train_step(x.to(dtype), y, torch.Generator().manual_seed(1)).loss)
    assert losses["bf16"] != pytest.approx(losses["fp32"], rel=1e-6)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert losses["bf16 on fp64"] == losses["fp64"]


def test_lr_schedules_match_reference():
    for schedule in ("paper", "authors", "constant"):
        for epochs in (120, 20, 3):
            for e in range(epochs):
                assert lr_at(e, epochs, 0.1, schedule) == pytest.approx(reference.ref_lr(e, epochs, 0.1, schedule))
    assert [lr_at(e, 120, 0.1, "paper") for e in (59, 60, 79, 80)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    # The authors' loop calls adjust_learning_rate(optimizer, epoch + 1) with thresholds 60/90/110:
    # 0-based epochs 59, 89 and 109 already run at the lower rates.
    assert [lr_at(e, 120, 0.1, "authors") for e in (58, 59, 88, 89, 108, 109)] == \
        pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001, 0.0005])


def test_authors_preset_reproduces_their_schedule():
    """Their adjust_learning_rate, written out as in pgd_var.py, called as their loop calls it."""
    def theirs(epoch_1based, lr=0.1):
        out = lr
        if epoch_1based >= 60:
            out = lr * 0.1
        if epoch_1based >= 90:
            out = lr * 0.01
        if epoch_1based >= 110:
            out = lr * 0.005
        return out

    cfg = make_train_config("authors", dataset="digits", model="cnn", width=4, device="cpu")
    trainer = Trainer(cfg, build_for_config(cfg, torch.device("cpu")))
    assert [trainer.set_epoch_lr(e) for e in range(120)] == pytest.approx([theirs(e + 1) for e in range(120)])
    assert trainer.set_epoch_lr(59) == pytest.approx(0.01)
    # the paper's stated schedule keeps its 0-based milestones (x0.1 at 60, x0.01 at 80)
    paper = make_train_config("paper", dataset="digits", model="cnn", width=4, device="cpu")
    assert [lr_at(e, 120, 0.1, paper.schedule) for e in (59, 60, 79, 80)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_resume_continues_exactly(tmp_path, tiny_overrides, device):
    """A run cut after its first epoch and resumed ends with the uninterrupted run's losses and
    weights, bit for bit. On CUDA that needs the deterministic switch (cuDNN's algorithm choice,
    atomics in weight gradients); on the CPU it holds as it is."""
    cfg = make_train_config(None, **dict(tiny_overrides, method="fat-madry", lam=0.5, epochs=3,
                                         deterministic=device.type == "cuda"))
    flags = runtime.backend_flags()
    try:
        _resume_continues_exactly(tmp_path, cfg)
    finally:
        runtime.restore_backends(flags)


def _resume_continues_exactly(tmp_path, cfg):
    full, log_full = train(cfg, str(tmp_path / "full"), progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, str(tmp_path / "cut"), progress=False, on_epoch=stop_after_first)
    resumed, log_resumed = train(cfg, str(tmp_path / "cut"), resume=True, progress=False)
    assert [r["loss"] for r in log_resumed] == [r["loss"] for r in log_full]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # resuming a finished run does nothing more
    again, log_again = train(cfg, str(tmp_path / "cut"), resume=True, progress=False)
    assert len(log_again) == 3 and torch.equal(again.state_dict()["linear.weight"], full.state_dict()["linear.weight"])


def test_resume_refuses_a_different_config(tmp_path, tiny_overrides):
    cfg = make_train_config(None, **dict(tiny_overrides, epochs=1))
    train(cfg, str(tmp_path), progress=False)
    other = make_train_config(None, **dict(tiny_overrides, epochs=1, lr=0.01))
    with pytest.raises(UserError, match="lr"):
        train(other, str(tmp_path), resume=True, progress=False)


def test_divergence_is_caught_and_nothing_is_saved(tmp_path, tiny_overrides):
    cfg = make_train_config(None, **dict(tiny_overrides, method="fat-madry", lam=1e30, lr=1e30))
    with pytest.raises(NonFiniteLoss, match="diverged"):
        train(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "config.json").exists()


def test_training_learns_and_logs(tmp_path, tiny_overrides):
    cfg = make_train_config(None, **dict(tiny_overrides, method="madry", epochs=3, train_limit=None))
    _, log = train(cfg, str(tmp_path), progress=False)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["loss"] < log[0]["loss"]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "config.json").exists()


def test_attack_leaves_parameter_grads_and_mode_alone(tiny_overrides, device):
    cfg = make_train_config(None, **tiny_overrides)
    model = build_for_config(cfg, device)
    trainer = Trainer(cfg, model)
    assert trainer.device == device
    x, y = next(iter(MemoryLoader(make_synthetic()[0], 8, False, device=device)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = trainer.adversarial(x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "BN stats untouched"
    assert (x_adv - x).abs().max() <= cfg.eps_train + 1e-6 and not torch.equal(x_adv, x)


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    """bf16 emulated on a CPU without AVX512-BF16 is many times slower: say so once, don't fail."""
    from fastfat import runtime as T
    cpu = torch.device("cpu")
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        assert T.amp_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T.amp_dtype("bf16", cpu) == torch.bfloat16
        assert T.amp_dtype("auto", cpu) is None and T.amp_dtype("off", cpu) is None


def test_trainer_reads_its_device_off_the_model(tiny_overrides, device):
    """Trainer(cfg, model) without a device: the model's device, not the CPU (a CUDA model would
    otherwise resolve amp "auto" to off and train under CPU autocast)."""
    cfg = make_train_config(None, **dict(tiny_overrides, device="cpu"))
    model = build_for_config(cfg, "cpu").to("meta")
    trainer = Trainer(cfg, model)
    assert trainer.device == torch.device("meta")
    trainer = Trainer(cfg, build_for_config(cfg, device))
    assert trainer.device == device
    assert trainer.amp == (torch.bfloat16 if device.type == "cuda" else None)   # amp "auto"


def test_epoch_clock_reads_after_a_device_sync(monkeypatch, tiny_overrides):
    """train_epoch's seconds and images/s: the clock is read only right after a device sync,
    before the first step and after the last (CUDA calls return when queued)."""
    import fastfat.train as T
    cfg = make_train_config(None, **dict(tiny_overrides, device="cpu"))
    trainer = Trainer(cfg, build_for_config(cfg, "cpu"))
    events = []
    monkeypatch.setattr(T, "synchronize", lambda device: events.append("sync"))
    real_clock = T.time.perf_counter
    monkeypatch.setattr(T.time, "perf_counter", lambda: events.append("clock") or real_clock())
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a: events.append("step") or step(*a))
    loader = MemoryLoader(make_synthetic()[0].subset(64), 32, True)
    T.train_epoch(trainer, loader, 0)
    assert events == ["sync", "clock", "step", "step", "sync", "clock"]
