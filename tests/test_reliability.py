"""Bad input and faults outside the sweep database (issue 12): each defect's reproduction, which
failed before its fix. Bad input -> one `fastfat: error:` line, exit 2, before any work."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastfat import cli, files
from fastfat.config import make_eval_config, make_train_config
from fastfat.config_values import resolve_step
from fastfat.data import load_dataset
from fastfat.errors import UserError
from fastfat.runfiles import CHECKPOINT, build_for_config
from fastfat.train import NonFiniteLoss, Trainer, check_finite, check_model, train, train_epoch, warmup_lam

# loader "memory": "auto" imports ffcv to look for its files (a numba compile, seconds)
TINY = dict(dataset="synthetic", model="cnn", width=8, epochs=1, batch_size=32, steps=2,
            step_size="eps/2", eps_train=8 / 255, lr=0.05, train_limit=64, schedule="constant",
            device="cpu", loader="memory")


def _main(capsys, *argv) -> tuple[int, list[str]]:
    """fastfat's CLI in this process: (exit code, stderr lines)."""
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


def _one_error_line(rc, lines, needle):
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fastfat: error:") and needle in lines[0], lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "run"
    train(make_train_config(None, **TINY), str(out), progress=False)
    return out


def _sweep_file(tmp_path, **train_keys) -> str:
    lines = ['db = "s.db"', "threads = 1", "[grid]", 'method = ["madry"]', 'eps_train = ["8/255"]',
             "[train]", 'dataset = "synthetic"', 'model = "cnn"', "epochs = 1", "train_limit = 32"]
    lines += [f"{k} = {v}" for k, v in train_keys.items()]
    path = tmp_path / "g.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# D1, D2 and edge values: validation

@pytest.mark.parametrize("spec", ["eps/0", "eps/.", "eps/0.0", ".*eps"])
def test_bad_step_size_is_one_user_error(spec):
    with pytest.raises(UserError, match="step size"):
        resolve_step(spec, 0.1)
    with pytest.raises(UserError, match="step_size"):
        make_train_config(None, **dict(TINY, step_size=spec))


def test_bad_step_size_on_the_command_line_and_in_a_sweep(tmp_path, capsys):
    out = tmp_path / "o"
    _one_error_line(*_main(capsys, "train", "--preset", "demo", "--epochs", "1", "--out", str(out),
                           "--step-size", "eps/0"), "step_size")
    assert not out.exists()
    _one_error_line(*_main(capsys, "sweep", _sweep_file(tmp_path, step_size='"eps/0"')), "step_size")
    assert not (tmp_path / "s.db").exists()


def test_seed_range(tmp_path, capsys):
    for bad in (10 ** 20, 2 ** 64, 2 ** 32, -1):
        with pytest.raises(UserError, match="seed"):
            make_train_config(None, **dict(TINY, seed=bad))
        with pytest.raises(UserError, match="seed"):
            make_eval_config(None, seed=bad)
    # the largest seed works through every stream it feeds (torch.Generator.manual_seed)
    cfg = make_train_config(None, **dict(TINY, seed=2 ** 32 - 1, epochs=2, train_limit=32))
    _, log = train(cfg, None, progress=False)
    assert len(log) == 2
    out = tmp_path / "o"
    _one_error_line(*_main(capsys, "train", "--preset", "demo", "--out", str(out),
                           "--seed", "99999999999999999999"), "seed")
    assert not out.exists()
    # a sweep rejects it before it creates its database
    _one_error_line(*_main(capsys, "sweep", _sweep_file(tmp_path, seed="99999999999999999999")), "seed")
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("key", ["lr", "lam", "beta", "weight_decay"])
def test_infinite_values_are_rejected(key):
    with pytest.raises(UserError, match=key):
        make_train_config(None, **dict(TINY, method="fat-madry", **{key: math.inf}))
    with pytest.raises(UserError, match=key):
        make_train_config(None, **dict(TINY, method="fat-madry", **{key: "inf"}))


def test_infinite_kappa_and_zero_step_are_rejected():
    with pytest.raises(UserError, match="cw_kappa"):
        make_eval_config(None, cw_kappa=math.inf)
    for spec in ("0", "eps/inf", "0*eps"):
        with pytest.raises(UserError, match="step_size"):
            make_train_config(None, **dict(TINY, step_size=spec))
    # natural training has no attack: a step of 0 (eps 0) is fine there
    assert make_train_config(None, **dict(TINY, method="natural", eps_train=0.0, step_size="eps/4")).alpha() == 0


# ---------------------------------------------------------------------------------------------
# D3, D7: --out checked before any work

def _no_work(*args, **kwargs):
    raise AssertionError("the work started before --out was checked")


@pytest.mark.parametrize("kind", ["file", "under-a-file", "empty"])
def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, run_dir, kind):
    import fastfat.cli.eval as cli_eval
    import fastfat.cli.report as cli_report
    import fastfat.cli.train as cli_train
    monkeypatch.setattr(cli_train, "train", _no_work)
    monkeypatch.setattr(cli_eval, "evaluate_checkpoint", _no_work)
    monkeypatch.setattr(cli_report, "write_report", _no_work)
    f = tmp_path / "f"
    f.write_text("x")
    out = {"file": str(f), "under-a-file": str(f / "sub"), "empty": ""}[kind]
    needle = {"file": "is a file", "under-a-file": "not a directory", "empty": "empty"}[kind]
    _one_error_line(*_main(capsys, "train", "--preset", "demo", "--epochs", "1", "--out", out), needle)
    _one_error_line(*_main(capsys, "eval", "--checkpoint", str(run_dir / CHECKPOINT), "--out", out), needle)
    _one_error_line(*_main(capsys, "report", str(f), "--out", out), needle)
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused(tmp_path, capsys, monkeypatch):
    import fastfat.cli.train as cli_train
    monkeypatch.setattr(cli_train, "train", _no_work)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_error_line(*_main(capsys, "train", "--preset", "demo", "--out", str(ro / "sub")), "not writable")
    finally:
        ro.chmod(0o755)


def test_check_writable_dir_accepts_new_and_existing_dirs(tmp_path):
    files.check_writable_dir(str(tmp_path), "--out")
    files.check_writable_dir(str(tmp_path / "a" / "b"), "--out")
    assert not (tmp_path / "a").exists()          # checking creates nothing


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    import fastfat.cli.train as cli_train
    monkeypatch.setattr(cli_train, "train", lambda *a, **k: (None, []))
    assert cli.main(["train", "--preset", "demo", "--out", str(tmp_path / "new"), "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# D5: classes absent from the test subset

def test_eval_with_absent_classes_writes_null_and_counts(tmp_path, capsys, run_dir):
    out = tmp_path / "ev"
    rc = cli.main(["eval", "--checkpoint", str(run_dir / CHECKPOINT), "--test-limit", "5",
                   "--attacks", "fgsm", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = json.loads((out / "eval.json").read_text())
    assert [r["attack"] for r in recs] == ["clean", "fgsm", "fgsm"]
    for r in recs:
        counts = r["class_count"]
        assert sum(counts) == 5 and len(counts) == 10 and 0 in counts
        assert [a is None for a in r["class_acc"]] == [n == 0 for n in counts]
        assert [v is None for v in r["class_loss"]] == [n == 0 for n in counts]
        present = [a for a in r["class_acc"] if a is not None]
        assert r["avg_acc"] == pytest.approx(sum(present) / len(present), abs=1e-12)
        assert r["worst_acc"] == min(present)
        assert r["vcra"] == pytest.approx(float(np.var(present)), abs=1e-12)
    with pytest.raises(ValueError):            # the writer still refuses NaN
        files.atomic_write_json(str(tmp_path / "nan.json"), {"x": math.nan})


# ---------------------------------------------------------------------------------------------
# D6: a blow-up in an epoch's last step

def test_blow_up_in_the_last_step_writes_no_checkpoint(tmp_path):
    # one step per epoch: the loss is computed before the update, so only the model after it
    # shows the blow-up (weights about 1e28, still finite)
    cfg = make_train_config(None, **dict(TINY, lr=1e30, train_limit=32))
    with pytest.raises(NonFiniteLoss, match="after epoch 1's last step"):
        train(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_check_model_weights_and_eval_loss():
    cfg = make_train_config(None, **TINY)
    model = build_for_config(cfg, "cpu")
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    check_model(model, x, y, 0)                 # healthy: no error, train mode kept
    assert model.training
    model.eval()
    check_model(model, x, y, 0)
    assert not model.training
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e28)                        # finite, but the eval forward overflows
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLoss, match="loss of"):
        check_model(model, x, y, 0)
    with torch.no_grad():
        next(model.parameters())[0].fill_(math.nan)
    with pytest.raises(NonFiniteLoss, match="non-finite weights"):
        check_model(model, x, y, 0)


def test_divergence_errors_name_the_levers():
    with pytest.raises(NonFiniteLoss) as e:
        check_finite(math.nan, 0, 3)
    for lever in ("--lr", "--lam", "--clip-grad-norm", "--lam-warmup-epochs"):
        assert lever in str(e.value)


# ---------------------------------------------------------------------------------------------
# D11: Ctrl-C with two torch threads

def test_ctrl_c_with_two_threads_exits_130_cleanly(tmp_path):
    """SIGINT while the shard pool's two workers attack: exit 130, no abort. Before the fix 4 of
    5 such runs died with SIGABRT ("terminate called without an active exception"), so two runs
    miss the defect 1 time in 25."""
    args = ["--dataset", "synthetic", "--model", "cnn", "--width", "16", "--method", "fat-madry",
            "--lam", "0.5", "--steps", "5", "--step-size", "eps/4", "--eps-train", "0.1",
            "--batch-size", "64", "--train-limit", "64", "--epochs", "1000", "--loader", "memory",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    # SIG_DFL in the child: a shell's background job inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler
    procs = [subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(2); "
                               "from fastfat.cli import main; sys.exit(main(sys.argv[1:]))",
                               "train", "--out", str(tmp_path / f"r{i}"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
             for i in range(2)]
    rng = random.Random(0)
    try:
        for i, p in enumerate(procs):
            deadline = time.time() + 120
            while not (tmp_path / f"r{i}" / CHECKPOINT).exists():   # training is under way
                assert p.poll() is None and time.time() < deadline, p.communicate()
                time.sleep(0.02)
            time.sleep(rng.uniform(0.02, 0.2))
            p.send_signal(signal.SIGINT)
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 130 and "terminate called" not in err, (p.returncode, err)
            assert err.strip().splitlines() == ["fastfat: interrupted"], err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# ---------------------------------------------------------------------------------------------
# D12, D15: resuming after kill -9, and checkpoints with parts missing

def test_resume_removes_stale_temp_files_of_our_naming(tmp_path):
    run = tmp_path / "run"
    cfg = make_train_config(None, **TINY)
    train(cfg, str(run), progress=False)
    stale = [run / ".checkpoint.pt.k2x_9qab.tmp", run / ".log.jsonl.a1b2c3d4.tmp",
             run / ".config.json.zzzz0000.tmp"]
    kept = [run / "notes.tmp", run / ".checkpoint.pt.backup", run / ".other.abcd1234.tmp",
            run / "checkpoint.pt.tmp"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    _, log = train(cfg, str(run), resume=True, progress=False)   # finished: returns at once
    assert len(log) == 1
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


def _rewrite_checkpoint(src, dst, change):
    state = torch.load(src, weights_only=True)
    state.pop("digest")
    state.pop("format")
    change(state)
    files.save_checkpoint(str(dst), state)    # a valid digest over the altered contents


def test_checkpoint_with_a_missing_part_is_one_error(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    run.mkdir()
    _rewrite_checkpoint(run_dir / CHECKPOINT, run / CHECKPOINT, lambda s: s.pop("optimizer"))
    with pytest.raises(UserError, match="'optimizer'"):
        files.load_checkpoint(str(run / CHECKPOINT))
    cfg = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(UserError, match="'optimizer'"):
        train(make_train_config(None, **{k: v for k, v in cfg.items() if k != "preset"}), str(run),
              resume=True, progress=False)
    _one_error_line(*_main(capsys, "eval", "--checkpoint", str(run / CHECKPOINT), "--out",
                           str(tmp_path / "e")), "'optimizer'")


def test_checkpoint_whose_parts_do_not_fit_is_one_error(tmp_path, run_dir):
    run = tmp_path / "run"
    run.mkdir()
    _rewrite_checkpoint(run_dir / CHECKPOINT, run / CHECKPOINT,
                        lambda s: s["optimizer"].update(param_groups=[]))
    cfg = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(UserError, match="does not fit"):
        train(make_train_config(None, **{k: v for k, v in cfg.items() if k != "preset"}), str(run),
              resume=True, progress=False)


# ---------------------------------------------------------------------------------------------
# D16: CIFAR batches are unpickled with a restricted unpickler

def _fake_cifar(root, protocol=pickle.DEFAULT_PROTOCOL, n=6):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.RandomState(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.randint(0, 10, size=n).tolist()
        d = {b"data": x, b"labels": y, b"batch_label": name.encode(),
             b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        arrays[name] = (x, y)
    return base, arrays


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_malicious_cifar_pickle_runs_no_code(tmp_path):
    base, _ = _fake_cifar(str(tmp_path))
    marker = tmp_path / "marker"
    with open(os.path.join(base, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": _Payload(str(marker)), b"labels": [0]}, f)
    with pytest.raises(UserError, match="data_batch_1.*refused global builtins.exec") as e:
        load_dataset("cifar10", str(tmp_path))
    assert len(str(e.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_files_in_every_pickle_protocol_load(tmp_path, protocol):
    _, arrays = _fake_cifar(str(tmp_path), protocol)
    tr, te = load_dataset("cifar10", str(tmp_path))
    x, y = arrays["test_batch"]
    assert torch.equal(te.images, torch.from_numpy(x.reshape(-1, 3, 32, 32))) and te.labels.tolist() == y
    assert len(tr) == 30


def test_numpy_1_cifar_pickles_load(tmp_path):
    """The files torchvision downloads were written by numpy 1.x: numpy.core.multiarray._reconstruct."""
    base, arrays = _fake_cifar(str(tmp_path), 2)
    path = os.path.join(base, "test_batch")
    data = open(path, "rb").read()
    assert b"numpy._core.multiarray" in data
    open(path, "wb").write(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    _, te = load_dataset("cifar10", str(tmp_path))
    assert te.labels.tolist() == arrays["test_batch"][1]


# ---------------------------------------------------------------------------------------------
# Stabilising FAT: gradient clipping and a warm-up of lambda

def test_clip_grad_norm_bounds_the_step():
    """natural training, float64: the clipped gradient is g * c / (|g| + 1e-6) and SGD's first
    step (momentum buffer = gradient, no weight decay) moves the weights by -lr times it."""
    cfg = make_train_config(None, **dict(TINY, method="natural", eps_train=0.0, weight_decay=0.0))
    x, y = torch.rand(16, 3, 16, 16, dtype=torch.float64), torch.arange(16) % 10
    base = build_for_config(cfg, "cpu").double()
    init = {k: v.clone() for k, v in base.state_dict().items()}
    free = Trainer(cfg, base)
    free.train_step(x, y)
    g = [p.grad.clone() for p in base.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g])))
    for c in (norm / 4, 2 * norm):
        clipped_cfg = make_train_config(None, **dict(TINY, method="natural", eps_train=0.0,
                                                     weight_decay=0.0, clip_grad_norm=c))
        model = build_for_config(cfg, "cpu").double()
        model.load_state_dict(init)
        Trainer(clipped_cfg, model).train_step(x, y)
        scale = min(1.0, c / (norm + 1e-6))
        got = [p.grad for p in model.parameters()]
        got_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in got])))
        assert got_norm <= c and got_norm == pytest.approx(min(norm, c), rel=1e-5)
        for a, b in zip(got, g):
            torch.testing.assert_close(a, b * scale, rtol=1e-12, atol=0)
        for (name, p), gc in zip(model.named_parameters(), got):
            torch.testing.assert_close(p.detach(), init[name] - cfg.lr * gc, rtol=1e-12, atol=1e-15)


def test_warmup_lam_by_hand():
    assert [warmup_lam(2.0, 2, t, 5) for t in (1, 2, 5, 9, 10, 11, 50)] == \
        [2.0 * 1 / 10, 2.0 * 2 / 10, 2.0 * 5 / 10, 2.0 * 9 / 10, 2.0, 2.0, 2.0]
    assert warmup_lam(0.5, 0, 1, 5) == 0.5


def test_warmup_reaches_the_loss_step_by_step(monkeypatch, tmp_path):
    import fastfat.losses as L
    seen = []
    real = L.fat_loss

    def spy(logits_adv, y, num_classes, lam, *args, **kwargs):   # FAT-Madry's loss, as its state calls it
        seen.append(lam)
        return real(logits_adv, y, num_classes, lam, *args, **kwargs)

    monkeypatch.setattr(L, "fat_loss", spy)
    # 64 samples / batch 32: 2 steps per epoch; lambda 0.5 over 2 epochs = 4 steps
    cfg = make_train_config(None, **dict(TINY, method="fat-madry", lam=0.5, lam_warmup_epochs=2, epochs=3))
    _, log = train(cfg, str(tmp_path / "run"), progress=False)
    assert seen == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [r["lam"] for r in log] == [0.25, 0.5, 0.5]
    # a function of (epoch, step) only: epoch 2 of a fresh trainer (a resumed run) repeats it
    seen.clear()
    from fastfat.train import build_train_loader
    trainer = Trainer(cfg, build_for_config(cfg, "cpu"))
    train_epoch(trainer, build_train_loader(cfg, torch.device("cpu")), 1)
    assert seen == [0.375, 0.5]
    # off by default: the config's lambda at every step
    seen.clear()
    train(make_train_config(None, **dict(TINY, method="fat-madry", lam=0.5)), None, progress=False)
    assert seen == [0.5, 0.5]


def test_stabilisers_are_validated():
    for bad in (dict(clip_grad_norm=0.0), dict(clip_grad_norm=-1.0), dict(clip_grad_norm=math.inf),
                dict(lam_warmup_epochs=-1)):
        with pytest.raises(UserError, match=next(iter(bad))):
            make_train_config(None, **dict(TINY, **bad))
