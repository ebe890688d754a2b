"""Triton twins of kernels/torch_ops.py: same signatures, same semantics, fused memory passes.
This module gathers them; each kernel lives with its ops in one module (below).

Kernels (triton_pgd.py; triton_classes.py: the CE, class-stats and reduce kernels; triton_rows.py:
C&W and KL; triton_launch.py: Launch, run_launch and the shared limits):
  pgd_step_kernel     x_adv <- clamp(clamp(x_adv + alpha*sign(g), x_nat-eps, x_nat+eps), 0, 1), in place.
  ce_kernel           forward: per-sample CE + per-block class partial sums/counts of logits [N, C];
                       backward: dlogits = (softmax - onehot) * (wrow[i] + wcls[y_i]).
  class_stats_kernel  per-block class partial sums/counts of values [N].
  reduce_kernel       partials [G, 2K] -> [2K], summed in a fixed order (no atomics: same bits twice).
  cw_kernel           C&W margin per sample, and its gradient.
  kl_kernel           TRADES KL(softmax(nat) || softmax(adv)) per sample, and its gradients.

Every op is split into a *plan* (tensors -> `Launch`: kernel, grid, arguments, constexprs, no
launch) and `run_launch(launch)`. Plans work on meta tensors, so kernels/aot.py compiles exactly the
signatures these ops launch, for GPUs this machine does not have.

Interpreter: Triton builds its own library (tl.sum, tl.max, ...) for the interpreter or for the
compiler once, when triton is imported, and triton.jit decides when it decorates. So
TRITON_INTERPRET=1 must be set before triton is first imported; one process is either
interpreting (CPU tensors, tests) or compiling (CUDA tensors, ahead-of-time compiles).

Limits (fallbacks to the torch twin, each counted and warned about once, kernels/fallbacks.py):
storage dtypes other than fp32/fp16/bf16; pgd_step when the three tensors do not share one
dense layout with the batch dim outermost; row kernels when C > MAX_CLASSES (one row must fit
one tile: a wider head would need an online softmax over column chunks); empty inputs.
Launches run on the tensors' CUDA device (torch.cuda.device), whatever the current device is.
Labels must lie in [0, C) (torch raises on others; these kernels cannot check without a host sync).
"""
from __future__ import annotations

from . import fallbacks  # noqa: F401  (tests read T.fallbacks)
from .triton_classes import (ce_kernel, class_stats_kernel, reduce_kernel, class_ce_stats,  # noqa: F401
                             class_stats, fat_ce_loss, plan_ce, plan_class_stats, plan_reduce)
from .triton_launch import (DTYPES, INTERPRETED, MAX_CLASSES, NUM_WARPS, PGD_BLOCK, ROW_TILE, Launch,  # noqa: F401
                            device_guard, launch_device, run_launch)
from .triton_pgd import flat_layout_ok, pgd_step_kernel, pgd_step, plan_pgd_step  # noqa: F401
from .triton_rows import cw_kernel, kl_kernel, cw_margin, plan_cw, plan_kl, trades_kl  # noqa: F401

KERNELS = (pgd_step_kernel, ce_kernel, class_stats_kernel, reduce_kernel, cw_kernel, kl_kernel)
