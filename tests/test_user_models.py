"""Models and weights from outside fastfat: `--model FILE.py:Name` / `package.module:Name` in train,
eval and sweeps (checkpoints record the file's digest), `fastfat eval --model --weights
--dataset`, fastfat.evaluate_model, and every bad input one `fastfat: error:` line (exit 2) or the
same message as a ValueError."""
import json
import textwrap

import pytest
import torch
import torch.nn as nn

import fastfat
from fastfat.cli import main
from fastfat.config import make_train_config
from fastfat.data.datasets import load_dataset
from fastfat.fused.plan import user_model_fuses
from fastfat.models import build_model
from fastfat.sweep.grid import point_key

MODELS = textwrap.dedent('''
    import torch, torch.nn as nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, in_channels=3):
            super().__init__()
            self.register_buffer("mean", torch.full((1, in_channels, 1, 1), 0.3))
            self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            z = torch.relu(self.bn(self.conv(x - self.mean)))
            return self.fc(z.mean((2, 3)))

    def plain(num_classes):          # no in_channels: it is not offered
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def raises(num_classes, in_channels):
        raise RuntimeError("broken on purpose")

    def not_a_module(num_classes):
        return 3

    def flat(num_classes, in_channels):   # output [N, C, 1]: not logits
        return nn.Sequential(nn.Conv2d(in_channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(2))
    ''')


@pytest.fixture
def models_py(tmp_path, monkeypatch):
    path = tmp_path / "my_models.py"
    path.write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return path


def cli(capsys, *args):
    rc = main([*args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_spec_builds_with_the_arguments_it_takes(models_py):
    m = build_model("my_models.py:Net", 7, in_channels=1)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 7) and m.training
    assert build_model(f"{models_py}:plain", 4, in_channels=1)(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    assert build_model("torch.nn:Identity", 4) is not None   # package.module:Name
    cfg = make_train_config("demo", model="my_models.py:Net")
    assert cfg.model == f"{models_py}:Net"                  # absolute: resume elsewhere finds it
    assert "my-models-Net" in point_key(cfg) and "/" not in point_key(cfg)
    assert not user_model_fuses(cfg)   # a buffer beside children: fastfat.fused refuses it, said once


@pytest.mark.parametrize("spec, match", [
    ("nope.py:Net", "no such file"), ("my_models.py:Missing", "has no 'Missing'"),
    ("my_models.py:raises", "raised RuntimeError: broken on purpose"),
    ("my_models.py:not_a_module", "returned a int, not a torch nn.Module"),
    ("no_such_package_xyz:Net", "cannot import"),
])
def test_bad_specs_are_one_error_line(models_py, capsys, tmp_path, spec, match):
    rc, _, err = cli(capsys, "train", "--preset", "demo", "--model", spec, "--out", str(tmp_path / "r"),
                     "--epochs", "1", "--train-limit", "32", "--no-progress")
    assert rc == 2 and err.startswith("fastfat: error:") and len(err.strip().splitlines()) == 1
    assert match in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=match):
        build_model(spec, 10, in_channels=1)


def test_train_eval_and_changed_file_note(models_py, capsys, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--preset", "demo", "--model", "my_models.py:Net", "--out", str(out),
                     "--epochs", "1", "--train-limit", "64", "--test-limit", "20", "--loader", "memory",
                     "--no-progress")
    assert rc == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["model_source"]["spec"] == f"{models_py}:Net" and len(state["model_source"]["sha256"]) == 64
    rc, text, err = cli(capsys, "eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e"),
                        "--attacks", "fgsm", "--eps-test", "0.1", "--test-limit", "20", "--no-progress")
    assert rc == 0 and "changed" not in err, err
    models_py.write_text(MODELS + "\n# edited\n")
    rc, text, err = cli(capsys, "eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e"),
                        "--attacks", "fgsm", "--eps-test", "0.1", "--test-limit", "20", "--no-progress")
    assert rc == 0 and "my_models.py, which defines the model of" in err and "changed" in err


def _weights(tmp_path, models_py, wrap=None, prefix=""):
    torch.manual_seed(0)
    m = build_model(f"{models_py}:Net", 10, in_channels=1)
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    return path, m


@pytest.mark.parametrize("wrap, prefix", [(None, ""), ("state_dict", "module."), ("net", "")])
def test_eval_foreign_weights(models_py, capsys, tmp_path, wrap, prefix):
    path, m = _weights(tmp_path, models_py, wrap, prefix)
    rc, text, err = cli(capsys, "eval", "--model", "my_models.py:Net", "--weights", str(path), "--dataset",
                        "digits", "--attacks", "pgd5", "--eps-test", "0.1", "--test-per-class", "3",
                        "--out", str(tmp_path / "e"), "--no-progress")
    assert rc == 0, err
    recs = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["attack"] for r in recs] == ["clean", "pgd5"] and recs[0]["class_count"] == [3] * 10
    assert "VCRA x10^-2" in text
    test = load_dataset("digits")[1]
    x = torch.cat([test.images[test.labels == c][:3] for c in range(10)]).float() / 255
    y = torch.arange(10).repeat_interleave(3)
    acc = (m.eval()(x).argmax(1) == y).double().mean().item()
    assert recs[0]["avg_acc"] == pytest.approx(acc)


def test_weights_that_do_not_fit(models_py, capsys, tmp_path):
    path, m = _weights(tmp_path, models_py)
    sd = torch.load(path, weights_only=True)
    sd["extra.weight"] = sd.pop("fc.weight")
    torch.save(sd, path)
    base = ["eval", "--model", "my_models.py:Net", "--dataset", "digits", "--out", str(tmp_path / "e"),
            "--no-progress", "--test-limit", "10"]
    rc, _, err = cli(capsys, *base, "--weights", str(path))
    assert rc == 2 and "missing fc.weight" in err and "unexpected extra.weight" in err
    torch.save({"model": {"a": 1}}, path)
    rc, _, err = cli(capsys, *base, "--weights", str(path))
    assert rc == 2 and "no state_dict" in err
    rc, _, err = cli(capsys, *base, "--weights", str(tmp_path / "none.pt"))
    assert rc == 2 and "no such file" in err
    rc, _, err = cli(capsys, *base[:3], "--out", str(tmp_path / "e"))
    assert rc == 2 and "--weights" in err
    assert not (tmp_path / "e" / "eval.json").exists()


def test_evaluate_model_api(models_py):
    torch.manual_seed(0)
    model = build_model("my_models.py:Net", 10, in_channels=1).eval()
    test = load_dataset("digits")[1]
    x, y = test.images[:40].float() / 255, test.labels[:40]
    recs = fastfat.evaluate_model(model, x, y, attacks=("clean", "pgd5"), eps_test=(0.1,), batch_size=16)
    assert [r["attack"] for r in recs] == ["clean", "pgd5"] and sum(recs[0]["class_count"]) == 40
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    again = fastfat.evaluate_model(model, loader, attacks=("clean", "pgd5"), eps_test=0.1)
    for r, s in zip(again, recs):   # the same verdicts; the losses to fp32 rounding (other strides)
        assert r["class_loss"] == pytest.approx(s["class_loss"], rel=1e-6)
        assert {**r, "class_loss": 0} == {**s, "class_loss": 0}
    assert "worst" in fastfat.classwise_report(recs, print_it=False)
    for kwargs, match in ((dict(eps_test=(0.0,)), r"\(0, 1\]"), (dict(eps_test=(1.5,)), r"\(0, 1\]"),
                          (dict(num_classes=5), "num_classes is 5")):
        with pytest.raises(ValueError, match=match):
            fastfat.evaluate_model(model, x, y, **kwargs)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fastfat.evaluate_model(model, x, y - 1)
    with pytest.raises(ValueError, match="logits"):
        fastfat.evaluate_model(build_model("my_models.py:flat", 10, in_channels=1), x, y)
    with pytest.raises(ValueError, match="at least 4 classes"):
        fastfat.evaluate_model(build_model("my_models.py:Net", 3, in_channels=1), x, y % 3, attacks=("aa",))


def test_sweep_file_model_is_beside_the_sweep_file(models_py, tmp_path, monkeypatch):
    from fastfat.sweep.grid import build_sweep, read_sweep_file
    sweep = tmp_path / "s.toml"
    sweep.write_text('db = "r.db"\n[grid]\nmodel = ["my_models.py:Net", "cnn"]\nmethod = ["madry"]\n'
                     '[train]\npreset = "demo"\n')
    monkeypatch.chdir("/")
    doc, base = read_sweep_file(str(sweep), None)
    s = build_sweep(doc, base)
    models = [p.train.model for p in s.points]
    assert models == [f"{models_py}:Net", "cnn"]
    assert len({p.key for p in s.points}) == 2


def test_eval_refuses_a_model_whose_output_is_not_logits(models_py, capsys, tmp_path):
    torch.save(build_model("my_models.py:flat", 10, in_channels=1).state_dict(), tmp_path / "f.pt")
    rc, _, err = cli(capsys, "eval", "--model", "my_models.py:flat", "--weights", str(tmp_path / "f.pt"),
                     "--dataset", "digits", "--test-limit", "10", "--out", str(tmp_path / "e"), "--no-progress")
    assert rc == 2 and err.startswith("fastfat: error: the model must return logits [N, num_classes]")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e" / "eval.json").exists()
    rc, _, err = cli(capsys, "eval", "--model", "my_models.py:flat", "--weights", str(tmp_path / "f.pt"),
                     "--dataset", "digits", "--eps-test", "0", "--out", str(tmp_path / "e"), "--no-progress")
    assert rc == 2 and "eps_test" in err
