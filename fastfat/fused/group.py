"""train_fused: a fused group's run: per-member checkpoints after every epoch (the files
fastfat.train writes), resume after a kill, and members that diverge dropped while the others go on.

Exactness across a kill rests on one fact: a member's numbers depend on the group's shapes (how
many members, in which slots), never on the other members' values, since every fused op acts
per member. So a resumed group rebuilds the slots of the uninterrupted run: members whose
checkpoint is ahead (the kill fell between two members' checkpoint writes) ride along as
"ghosts", their results discarded, until the others catch up; a member that failed in an epoch
keeps its slot through that epoch (its failure is recorded in its run folder as failed.json,
written before the others' checkpoints) and is dropped after it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch.nn as nn

from ..config import TrainConfig
from ..config_dict import from_dict, to_dict
from ..data import load_dataset
from ..data.build import choose_loader
from ..data.split import loader_config, training_pool
from ..errors import UserError
from ..files import atomic_write_json, check_writable_dir
from ..runtime import resolve_device
from ..runfiles import CHECKPOINT, build_for_config, load_resume_state, save_run
from ..train import build_train_loader, make_optimizer
from .train import assemble, check_fusable, fused_epoch, snapshots

FAILED = "failed.json"


@dataclass
class MemberRun:
    """One member's outcome: its per-epoch log rows (as fastfat.train.train returns them), its
    final model (train mode; None if it failed) and error (None, or why it failed: the
    NonFiniteLoss message an unfused run would raise)."""
    cfg: TrainConfig
    out_dir: str | None
    log: list[dict] = field(default_factory=list)
    model: nn.Module | None = None
    error: str | None = None
    next_epoch: int = field(default=0, repr=False)          # 0-based epoch it trains next
    failed_epoch: int | None = field(default=None, repr=False)
    snapshot: dict | None = field(default=None, repr=False)   # {"model", "optimizer"} at next_epoch

    @property
    def done(self) -> bool:
        return self.error is None and self.next_epoch >= self.cfg.epochs


def train_fused(cfgs: list[TrainConfig], out_dirs: list[str | None] | None = None, *,
                resume: bool = False, progress: bool = True, on_epoch=None, on_failure=None,
                position: int = 0) -> list[MemberRun]:
    """Train K compatible grid points (check_fusable) as one fused model; returns one MemberRun
    per config, in order. Each member's results equal its unfused train(cfg, out_dir) run (float64:
    to rounding; fp32: within the unfused path's own rounding drift) and its out_dir holds the
    same files: config.json, checkpoint.pt after every epoch (atomic), log.jsonl.

    resume: continue each member from its checkpoint (its config must match), also from an
    unfused run's; a finished member returns at once. A member whose loss becomes NaN/inf is
    marked failed (MemberRun.error; out_dir/failed.json {"error", "epoch", "config"}; nothing is
    saved for that epoch) and dropped from the group after that epoch; the others go on. With
    resume, a member whose failed.json is newer than its checkpoint stays failed (its
    deterministic rerun would fail the same way); without resume, failed.json is removed.
    on_epoch(k, row) runs after member k's checkpoint for that epoch is on disk;
    on_failure(k, error) once per failed member, including members failed in an earlier run.
    UserError (before any work) if the configs cannot fuse or out_dirs repeat.
    """
    out_dirs = _check_group(cfgs, out_dirs)
    device = resolve_device(cfgs[0].device)
    members = [MemberRun(c, d) for c, d in zip(cfgs, out_dirs)]
    for m in members:
        _restore(m, resume, device)
    loaders = _loaders(cfgs, device)
    for i, m in enumerate(members):
        if m.error is not None and on_failure is not None:
            on_failure(i, m.error)

    epochs = cfgs[0].epochs
    live = [m.next_epoch for m in members if m.error is None]
    trainer, slots, had_ghosts = None, None, False
    for epoch in range(min(live, default=epochs), epochs):
        # The uninterrupted run's slots: every member not failed before this epoch.
        now = [i for i, m in enumerate(members) if m.error is None or m.failed_epoch >= epoch]
        real = [i for i in now if members[i].error is None and members[i].next_epoch == epoch]
        if not real:   # every member behind has failed; those ahead (if any) wait for their epoch
            trainer = None
            continue
        ghosts = len(real) < len(now)
        if trainer is None or now != slots or had_ghosts or ghosts:
            trainer = assemble([cfgs[i] for i in now], [members[i].snapshot for i in now], device)
            slots = now
        had_ghosts = ghosts
        rows, errors = fused_epoch(trainer, [loaders[i] for i in now], epoch, progress=progress,
                                   position=position)
        _settle_epoch(members, now, real, epoch, rows, errors, snapshots(trainer), on_epoch, on_failure)
    for m in members:
        if m.error is None:
            m.model = build_for_config(m.cfg, device)
            if m.snapshot is not None:
                m.model.load_state_dict(m.snapshot["model"])
    return members


def _check_group(cfgs: list[TrainConfig], out_dirs: list[str | None] | None) -> list[str | None]:
    """The members' run folders (None each without out_dirs); UserError, before any work, if the
    configs cannot fuse or the folders are not one writable folder per member."""
    check_fusable(cfgs)
    k = len(cfgs)
    out_dirs = list(out_dirs) if out_dirs is not None else [None] * k
    if len(out_dirs) != k:
        raise UserError(f"{k} grid points but {len(out_dirs)} run folders")
    named = [os.path.abspath(d) for d in out_dirs if d]
    if len(set(named)) != len(named):
        raise UserError("two members of a fused group share a run folder")
    for d in named:
        check_writable_dir(d, "out_dir")   # before any work, as train() does
    return out_dirs


def _settle_epoch(members: list[MemberRun], now: list[int], real: list[int], epoch: int, rows, errors,
                  snaps, on_epoch, on_failure) -> None:
    """After a fused epoch over slots `now` (members[now[slot]]): each real (not ghost) member
    either failed (error, failed.json, on_failure) or gets its log row and snapshot; then the
    others' checkpoints are saved and on_epoch called, failures first (a resume knows the slots)."""
    ok = []
    for slot, i in enumerate(now):
        m = members[i]
        if i not in real:
            continue
        if errors[slot] is not None:
            m.error, m.failed_epoch = errors[slot], epoch
            if m.out_dir:   # before the others' checkpoints: a resume knows the slots
                atomic_write_json(os.path.join(m.out_dir, FAILED), {
                    "error": m.error, "epoch": epoch + 1, "config": to_dict(m.cfg)})
            if on_failure is not None:
                on_failure(i, m.error)
        else:
            m.log.append(rows[slot])
            m.snapshot, m.next_epoch = snaps[slot], epoch + 1
            ok.append(i)
    for i in ok:
        m = members[i]
        if m.out_dir:
            save_run(m.out_dir, m.cfg, epoch, m.log, m.snapshot["model"], m.snapshot["optimizer"])
        if on_epoch is not None:
            on_epoch(i, m.log[-1])


def _restore(m: MemberRun, resume: bool, device) -> None:
    """The member's state from its run folder: checkpoint and log (resume), failure record."""
    failed = os.path.join(m.out_dir, FAILED) if m.out_dir else None
    if not resume:
        if failed and os.path.exists(failed):
            os.unlink(failed)
        return
    state = load_resume_state(m.cfg, m.out_dir)
    if state is not None:
        try:   # as train() loads it, so a file that does not fit fails here, before any work
            model = build_for_config(m.cfg, device)
            model.load_state_dict(state["model"])
            make_optimizer(m.cfg, model.parameters()).load_state_dict(state["optimizer"])
            m.snapshot = {"model": state["model"], "optimizer": state["optimizer"]}
            m.next_epoch = int(state["epoch"]) + 1
            m.log = [json.loads(r) for r in state["log"]]
        except Exception as e:
            raise UserError(f"--resume: {os.path.join(m.out_dir, CHECKPOINT)} does not fit its config "
                            f"({type(e).__name__}); move it away to start afresh") from None
    if failed and os.path.exists(failed):
        rec = _read_failure(failed, m.cfg)
        if rec["epoch"] - 1 >= m.next_epoch:   # else a later run got past it: stale
            m.error, m.failed_epoch = rec["error"], rec["epoch"] - 1


def _read_failure(path: str, cfg: TrainConfig) -> dict:
    try:
        with open(path) as fh:
            rec = json.load(fh)
        saved = from_dict(TrainConfig, rec["config"])
        rec = {"error": str(rec["error"]), "epoch": int(rec["epoch"]), "config": saved}
    except (OSError, ValueError, KeyError, TypeError, UserError):
        raise UserError(f"cannot read {path}: not a fused failure record") from None
    if to_dict(saved) != to_dict(cfg):
        raise UserError(f"--resume: {path} records a run with a different config")
    return rec


def _loaders(cfgs: list[TrainConfig], device) -> list:
    """One training loader per member (its own seed), sharing one copy of the data set."""
    c = cfgs[0]
    kind = choose_loader(c.loader, c.data_root, c.dataset)
    data = None
    if kind in ("memory", "torchvision"):
        data = load_dataset(c.dataset, c.data_root, c.download)[0]
        if kind == "memory":
            data = data.to(device)   # each MemoryLoader's .to(device) is then a no-op
    if c.train_per_class is not None:   # each member its own seed's balanced pool, in memory
        return [build_train_loader(loader_config(cfg), device, training_pool(cfg, data))
                for cfg in cfgs]
    return [build_train_loader(cfg, device, data) for cfg in cfgs]
