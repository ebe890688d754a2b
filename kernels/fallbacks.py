"""Fallbacks from the Triton kernels to the plain-torch twins: counted, and warned about once.

A CUDA tensor that a Triton kernel cannot take (a dtype it does not handle, tensors of different
layouts, a class count above MAX_CLASSES, Triton that does not import) runs on the torch twin:
correct, but slower, and a benchmark that meant to time Triton would time torch. So every such
call is counted here (`counts()`, read by bench.gpu, which fails a stage whose "Triton" number
was timed on the twin) and the first call for each (op, reason) warns with the reason.
"""
from __future__ import annotations

import collections
import threading
import warnings


class KernelFallbackWarning(UserWarning):
    """A fastfat kernel ran on its torch twin instead of Triton."""


_COUNTS: collections.Counter = collections.Counter()
_WARNED: set[str] = set()
_LOCK = threading.Lock()   # the CPU shard pool calls kernels from worker threads


def record(op: str, reason: str) -> None:
    """Count one call of `op` served by the torch twin for `reason`; warn the first time."""
    key = f"{op}: {reason}"
    with _LOCK:
        _COUNTS[key] += 1
        first = key not in _WARNED
        _WARNED.add(key)
    if first:
        warnings.warn(f"fastfat.kernels: {op} runs on the torch twin, not Triton: {reason} "
                      "(warned once; fastfat.kernels.fallback_counts() counts every call)",
                      KernelFallbackWarning, stacklevel=3)


def counts() -> dict[str, int]:
    """{"op: reason": calls} since the last reset()."""
    with _LOCK:
        return dict(_COUNTS)


def reset() -> None:
    """Zero the counts (the once-per-reason warnings stay given)."""
    with _LOCK:
        _COUNTS.clear()
