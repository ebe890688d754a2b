"""TrainConfig.init_from: a run that starts from another run's weights (FRL fine-tunes this way)."""
import pytest
import torch

from fastfat.config import make_train_config
from fastfat.errors import UserError
from fastfat.runfiles import build_for_config
from fastfat.train import train

TINY = dict(dataset="digits", model="cnn", width=8, epochs=1, batch_size=64, steps=1, step_size="eps/2",
            eps_train=0.1, lr=0.05, train_limit=128, schedule="constant", device="cpu", method="madry")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A one-epoch run's checkpoint path and its trained weights."""
    out = tmp_path_factory.mktemp("source")
    model, _ = train(make_train_config(None, **TINY), str(out), progress=False)
    return str(out / "checkpoint.pt"), {k: v.clone() for k, v in model.state_dict().items()}


def test_a_run_starts_from_the_checkpoints_weights(tmp_path, source):
    path, weights = source
    # a learning rate of 1e-30 leaves the weights where they start: the source's trained ones,
    # not the seed's initial ones (which the same config would start from without init_from)
    cfg = make_train_config(None, **dict(TINY, lr=1e-30, init_from=path))
    model, _ = train(cfg, str(tmp_path / "b"), progress=False)
    fresh = build_for_config(make_train_config(None, **TINY), torch.device("cpu")).state_dict()
    for k, v in weights.items():
        if v.is_floating_point() and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(fresh[k], weights[k]) for k in weights if weights[k].is_floating_point())


def test_a_model_that_does_not_fit_is_one_clear_error(tmp_path, source):
    path, _ = source
    cfg = make_train_config(None, **dict(TINY, width=16, init_from=path))
    with pytest.raises(UserError, match=r"init_from: .* holds a cnn width 8 on digits; this run trains "
                                        r"a cnn width 16 on digits \(width differ\)"):
        train(cfg, str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
    cfg = make_train_config(None, **dict(TINY, init_from=str(tmp_path / "nope.pt")))
    with pytest.raises(UserError, match="checkpoint not found"):
        train(cfg, str(tmp_path / "b"), progress=False)


def test_an_empty_init_from_is_refused():
    with pytest.raises(UserError, match="init_from: give a checkpoint path"):
        make_train_config(None, **dict(TINY, init_from=" "))
