"""A sweep's run keys, from its file and flags, parsed and checked: the process counts (threads,
workers), fuse, and the Ray keys as RaySettings."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class RaySettings:
    """How a sweep runs on a Ray cluster (sweep-file keys ray, ray_cpus, ray_gpus, ray_retries)."""
    address: str                  # "local": start a Ray instance here; "auto", host:port, ray://...: join
    cpus: int | None = None       # CPUs per task (None: the sweep's threads, else 1)
    gpus: float | None = None     # GPUs per task (None: 1 on a cluster with GPUs, else 0)
    retries: int = 3              # re-runs of a task whose worker or node died



def count_setting(name: str, value) -> int | None:
    """A top-level count (threads, workers) as an int >= 1 (None stays None); UserError otherwise."""
    if value is None:
        return None
    try:
        ok = not isinstance(value, (bool, float)) and int(value) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def fuse_setting(value) -> int | str:
    """The sweep file's fuse (an integer or "auto") or the --fuse flag's text ("4", "auto") as
    an int >= 1 or "auto"; UserError otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise UserError(f"fuse must be an integer >= 1 (grid points per fused group; 1: no fusion) or "
                    f"\"auto\", got {value!r}")


def ray_settings(keys: dict) -> RaySettings | None:
    """The ray* keys (file and flags merged) as RaySettings; None for a sweep in this process
    (no ray key, ray = false or "off"). UserError naming the key at fault."""
    address = keys.get("ray")
    if address is True or address in ("", "local"):
        address = "local"
    elif address is None or address is False or address == "off":
        return None
    elif not isinstance(address, str):
        raise UserError(f"ray must be true, \"local\", \"auto\" or a cluster address, got {address!r}")
    cpus, gpus, retries = keys.get("ray_cpus"), keys.get("ray_gpus"), keys.get("ray_retries", 3)
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
        raise UserError(f"ray_cpus must be an integer >= 1 (CPUs per grid point), got {cpus!r}")
    if gpus is not None:
        ok = not isinstance(gpus, bool) and isinstance(gpus, (int, float)) and 0 <= gpus < math.inf
        if not ok or (gpus > 1 and gpus != int(gpus)):
            raise UserError(f"ray_gpus must be a fraction in [0, 1] or a whole number of GPUs per "
                            f"grid point, got {gpus!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise UserError(f"ray_retries must be an integer >= 0, got {retries!r}")
    return RaySettings(address, cpus, None if gpus is None else float(gpus), retries)
