"""Checkpoint selection on a validation split: the stratified hold-out, the config's checks, and
a digits run end to end (log rows, best.pt, resume)."""
import json

import pytest
import torch

from fastfat.config import make_train_config
from fastfat.data import make_synthetic
from fastfat.data.split import holdout_counts, stratified_holdout
from fastfat.errors import UserError
from fastfat.files import load_checkpoint
from fastfat.selection import BEST, CRITERION
from fastfat.runfiles import CHECKPOINT, load_model
from fastfat.train import train


def test_holdout_counts_by_hand():
    assert holdout_counts([10, 20, 5], 3) == [3, 3, 3]
    assert holdout_counts([10, 20, 5], 0.1) == [1, 2, 1]     # rounded, at least one
    assert holdout_counts([10, 20, 0], 0.5) == [5, 10, 0]    # an absent class holds nothing out
    with pytest.raises(UserError, match="class 2"):
        holdout_counts([10, 20, 5], 5)                         # class 2 would keep none


def test_stratified_holdout_is_stratified_disjoint_and_seeded():
    data, _ = make_synthetic(200, 0, seed=0)
    train, val = stratified_holdout(data, 4, seed=1)
    assert torch.bincount(val.labels, minlength=10).tolist() == [4] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == \
        (torch.bincount(data.labels, minlength=10) - 4).tolist()
    # disjoint and covering: each image once (the synthetic images are all distinct)
    keys = lambda s: {bytes(im.flatten().tolist()) for im in s.images}
    assert len(keys(data)) == len(data)
    assert keys(train) | keys(val) == keys(data) and not keys(train) & keys(val)
    again, other = stratified_holdout(data, 4, seed=1)[1], stratified_holdout(data, 4, seed=2)[1]
    assert torch.equal(again.images, val.images) and not torch.equal(other.images, val.images)
    frac = stratified_holdout(data, 0.25, seed=1)[1]
    want = [max(1, round(0.25 * n)) for n in torch.bincount(data.labels, minlength=10).tolist()]
    assert torch.bincount(frac.labels, minlength=10).tolist() == want


@pytest.mark.parametrize("bad", [dict(val_per_class=0), dict(val_per_class=-1),
                                 dict(val_per_class=2.5), dict(val_per_class=3, loader="ffcv"),
                                 dict(val_per_class=3, eps_train=0.0, method="natural"),
                                 dict(val_attack="deepfool")])
def test_config_checks(bad):
    with pytest.raises(UserError):
        make_train_config("demo", **bad)


def _cfg(**kw):
    # (on this CPU the criterion picks epoch 3 of 4: the 4th has the higher average but a class at 0)
    return make_train_config("demo", method="madry", width=8, epochs=4, train_limit=1000, steps=2,
                             eps_train=0.1, val_per_class=10, val_attack="pgd3", device="cpu",
                             loader="memory", **kw)


def test_digits_run_selects_on_the_hold_out(tmp_path):
    """Every epoch's row has the validation numbers; best.pt holds the best-scoring epoch (an
    ordinary checkpoint that load_model reads); resuming after epoch 2 gives the same log and
    the same best.pt as the uninterrupted run."""
    cfg = _cfg()
    model, log = train(cfg, str(tmp_path / "full"), progress=False)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert 0 <= r["val_worst_acc"] <= r["val_avg_acc"] <= 1 and 0 <= r["val_clean_acc"] <= 1
        assert r["val_score"] == r["val_avg_acc"] + r["val_worst_acc"]
    best = max(range(4), key=lambda i: (log[i]["val_score"], -i))   # ties keep the earlier epoch
    state = load_checkpoint(str(tmp_path / "full" / BEST))
    assert state["epoch"] == best and state["selected_by"] == CRITERION
    assert state["val_score"] == log[best]["val_score"]
    assert [json.loads(r) for r in state["log"]] == log[:best + 1]
    best_model, best_cfg = load_model(str(tmp_path / "full" / BEST))
    assert best_cfg.val_per_class == 10
    if best == 3:   # the last epoch is the best: the same weights as checkpoint.pt
        last, _ = load_model(str(tmp_path / "full" / CHECKPOINT))
        assert all(torch.equal(a, b) for a, b in zip(best_model.state_dict().values(),
                                                     last.state_dict().values()))

    class Stop(Exception):
        pass

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise Stop
    with pytest.raises(Stop):
        train(cfg, str(tmp_path / "resumed"), progress=False, on_epoch=stop_after_2)
    _, resumed = train(cfg, str(tmp_path / "resumed"), resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    assert strip(resumed) == strip(log)
    again = load_checkpoint(str(tmp_path / "resumed" / BEST))
    assert again["epoch"] == best and all(torch.equal(again["model"][k], state["model"][k])
                                          for k in state["model"])
