"""A training run's files: config.json, checkpoint.pt and log.jsonl after every epoch (save_run),
read back to resume (load_resume_state), a starting checkpoint's weights (load_init_weights), the
model a config trains (build_for_config) and a trained model for evaluation (load_model; weights
that are not finite are refused)."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.nn as nn

from . import methods
from .config import TrainConfig
from .config_dict import from_dict, to_dict
from .data import dataset_info
from .errors import UserError
from .files import (atomic_write_json, atomic_write_text, load_checkpoint, made_dirs, remove_stale_temps,
                    save_checkpoint)
from .models import build_model
from .models.user import check_source, is_spec, source_record

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CONFIG = "config.json"
RUN_FILES = (CONFIG, CHECKPOINT, LOG, "best.pt", "co_best.pt")   # every name a run directory may get
# (selection.BEST, guard.BEST)


def load_resume_state(cfg: TrainConfig, out_dir: str | None) -> dict | None:
    """out_dir's checkpoint (a dict as save_run writes it), or None if there is none;
    UserError if it was trained with a different config. Removes the temporary files a writer
    killed mid-write left in out_dir (resuming is the one time no one else writes there)."""
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if out_dir:
        for name in (CHECKPOINT, LOG, CONFIG):
            remove_stale_temps(os.path.join(out_dir, name))
    if not (ckpt_path and os.path.exists(ckpt_path)):
        return None
    state = load_checkpoint(ckpt_path)
    saved = from_dict(TrainConfig, state["config"])
    if to_dict(saved) != to_dict(cfg):
        diff = [k for k, v in to_dict(cfg).items() if to_dict(saved).get(k) != v]
        raise UserError(f"--resume: {ckpt_path} was trained with a different config "
                        f"({', '.join(diff)} differ)")
    _note_source(state, cfg.model, ckpt_path)
    return state


def _note_source(state: dict, model: str, path: str) -> None:
    """A note on stderr when the user file that defines a checkpoint's model changed since."""
    note = check_source(state.get("model_source"), model, path) if is_spec(model) else None
    if note:
        print(f"fastfat: note: {note}", file=sys.stderr)


def load_init_weights(cfg: TrainConfig) -> dict | None:
    """The model weights (a state dict) of the checkpoint cfg.init_from names, loaded with its
    digest checked, or None without one. UserError if the file is missing or bad, or if it holds
    another model (name, width or data set) than cfg trains. A checkpoint of an unfinished run
    is taken, with a note on stderr."""
    if cfg.init_from is None:
        return None
    path = cfg.init_from
    state = load_checkpoint(path)
    src = state["config"]
    differ = [k for k in ("model", "width", "dataset") if src.get(k) != getattr(cfg, k)]
    if differ:
        show = lambda d: f"{d.get('model')} width {d.get('width')} on {d.get('dataset')}"
        raise UserError(f"init_from: {path} holds a {show(src)}; this run trains a {show(to_dict(cfg))} "
                        f"({', '.join(differ)} differ)")
    done, total = int(state["epoch"]) + 1, src.get("epochs")
    if isinstance(total, int) and done < total:
        print(f"fastfat: note: init_from {path} is after epoch {done} of {total} (an unfinished run)",
              file=sys.stderr)
    return state["model"]


def save_run(out_dir: str, cfg: TrainConfig, epoch: int, log: list[dict], model_state: dict,
             optimizer_state: dict, scaler_state: dict | None = None,
             method_state: dict | None = None) -> None:
    """A run's files after 0-based `epoch`: config.json, checkpoint.pt (atomic, verified) and
    log.jsonl. Fused groups write each member through here too, in the same format.
    method_state: the method's state_dict (fastfat.methods), kept as the checkpoint's "method";
    None for the base methods, which have no state (their checkpoints have no "method")."""
    save = {"model": model_state, "optimizer": optimizer_state, "epoch": epoch,
            "config": to_dict(cfg), "log": [json.dumps(r) for r in log]}
    if scaler_state is not None:
        save["scaler"] = scaler_state
    if method_state is not None:
        save["method"] = method_state
    if is_spec(cfg.model):   # a user's model file: its digest, to tell when it changed (check_source)
        save["model_source"] = source_record(cfg.model)
    # config.json lands with the first checkpoint: a run that fails early leaves nothing, and a
    # first checkpoint that does not fit (a full disk) takes its config.json and new dirs away.
    first = not os.path.exists(os.path.join(out_dir, CHECKPOINT))
    with made_dirs(out_dir):
        try:
            atomic_write_json(os.path.join(out_dir, CONFIG), to_dict(cfg))
            save_checkpoint(os.path.join(out_dir, CHECKPOINT), save)
            atomic_write_text(os.path.join(out_dir, LOG), "".join(json.dumps(r) + "\n" for r in log))
        except BaseException:
            if first:
                for name in (CONFIG, CHECKPOINT, LOG):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(out_dir, name))
            raise


def build_for_config(cfg: TrainConfig, device) -> nn.Module:
    """The model a config trains, on device, in channels_last when asked."""
    info = dataset_info(cfg.dataset)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = build_model(cfg.model, info.num_classes, width=cfg.width, in_channels=info.channels)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_teacher(cfg: TrainConfig, device) -> nn.Module | None:
    """The frozen teacher a distillation method learns from: cfg.teacher's model (digest-checked,
    eval mode, no parameter gradients) on device, or None without cfg.teacher. UserError if it
    was trained on another data set than cfg, or holds a weight that is not finite (its soft
    labels would be NaN, and the run would only say it diverged)."""
    if cfg.teacher is None:
        return None
    teacher, tcfg = load_model(cfg.teacher, device)
    if tcfg.dataset != cfg.dataset:
        raise UserError(f"teacher: {cfg.teacher} was trained on {tcfg.dataset}; this run trains on "
                        f"{cfg.dataset}")
    bad = next((k for k, v in teacher.state_dict().items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"teacher: {cfg.teacher} holds weights that are not finite (NaN or inf, in "
                        f"{bad}); give a teacher that trained without diverging")
    return teacher.requires_grad_(False)


def load_model(path: str, device="cpu") -> tuple[nn.Module, TrainConfig]:
    """A trained model (eval mode) and its config from a checkpoint; UserError if bad. The
    weights are a peer method's evaluation weights where it has them (CFA: FAWA's average), the
    trained ones otherwise."""
    state = load_checkpoint(path)
    try:
        cfg = from_dict(TrainConfig, state["config"]).validate()
        _note_source(state, cfg.model, path)
        model = build_for_config(cfg, torch.device(device))
        weights = methods.eval_weights(state)
        model.load_state_dict(state["model"] if weights is None else weights)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint {path} does not fit its own config ({type(e).__name__})") from None
    check_finite_weights(model, path)
    return model.eval(), cfg


def check_finite_weights(model: nn.Module, path: str) -> None:
    """UserError naming the checkpoint and the first tensor (parameter or buffer, such as a
    BatchNorm's running variance) that holds NaN or inf: such a model's outputs are not finite,
    and an argmax of NaN is class 0, so it must not be evaluated or learnt from."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"the model's outputs are not finite (NaN/inf): the weights of checkpoint "
                            f"{path} hold NaN or inf ({name})")
