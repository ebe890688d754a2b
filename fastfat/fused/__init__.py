"""Fused grid points: K compatible training runs as one channel-stacked model (model.py), trained
by one optimizer with each member's own seeds, radii, lambda and random streams (train.py), with
per-member checkpoints, resume and failures (group.py), grouped by plan.py.

    runs = train_fused(cfgs, out_dirs, resume=True)    # one MemberRun per config
"""
from .group import MemberRun, train_fused
from .model import FusedLinear, FusedModel, fuse_models, split_models
from .plan import auto_k, plan_groups
from .train import FusedTrainer, check_fusable, fuse_key

__all__ = ["FusedLinear", "FusedModel", "FusedTrainer", "MemberRun", "auto_k", "check_fusable",
           "fuse_key", "fuse_models", "plan_groups", "split_models", "train_fused"]
