"""Reaching Ray for a sweep: importing it (one line saying how to install it when missing), and
joining a cluster or starting a local instance, with an unreachable address found in seconds
(a socket probe) rather than after ray.init's minutes of retries."""
from __future__ import annotations

import logging
import os
import socket

from ..errors import UserError

INSTALL = "pip install 'fastfat[ray]'"
PROBE_S = 10.0        # how long to wait for the cluster's address to answer


def import_ray():
    """The ray module, or UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def connect(ray, address: str) -> bool:
    """Start a local Ray instance ("local") or join a cluster; False if already connected."""
    if ray.is_initialized():
        return False
    if address != "local":
        _probe(address)
    # ERROR: Ray's start-up notes would interleave with the bars; its errors still show.
    kw = dict(logging_level=logging.ERROR, include_dashboard=False) if address == "local" else \
        dict(logging_level=logging.ERROR)
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("" if address == "local" or os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else
                "; if the cluster uses token authentication (recent Ray turns it on in `ray start`), set "
                "RAY_AUTH_MODE=token here with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise UserError(f"cannot connect to the Ray cluster at {address}: {first}{hint}") from None
    return True


def _probe(address: str) -> None:
    """UserError unless something listens at the cluster's address: ray.init waits minutes for a
    head that is not there (also for a stale address 'auto' finds from an earlier `ray start`)."""
    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment  # how ray.init resolves it
            target = get_ray_address_from_environment("auto", None)
        except ConnectionError as e:
            raise UserError(f"--ray auto: {e} Start one with `ray start --head`.") from None
        except Exception:   # a Ray version without this helper: let ray.init find it
            return
    hostport = target.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep:   # Ray's default ports: the head's GCS, or a Ray Client server
        host, port = hostport, "10001" if target.startswith("ray://") else "6379"
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_S).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        seen = "" if target == address else f" (found {target})"
        raise UserError(f"cannot reach a Ray cluster at {address}{seen}: {why}; start its head with "
                        f"`ray start --head` or give its address") from None
