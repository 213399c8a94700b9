"""Connecting to Ray: a local instance by default, a cluster with ``--address``."""

from __future__ import annotations

import os
from typing import Any

import ray

from unibct_ray.errors import UserError

__all__ = ["ensure_ray", "unwrap_task_error"]


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Start (or connect to) Ray unless this process is already connected.

    ``address=None`` honours ``RAY_ADDRESS`` (set by ``ray job submit``) and otherwise starts a
    local instance. A local instance gets more logical CPUs than cores (at least 4): with exactly
    one per core, two 1-CPU train workers on a 2-core machine starve Ray Data's read tasks.
    """
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "include_dashboard": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e}") from None


def unwrap_task_error(err: BaseException) -> BaseException:
    """The user's exception inside a ``RayTaskError`` (whose str() holds a remote traceback)."""
    cause = getattr(err, "cause", None)
    while cause is not None and isinstance(err, ray.exceptions.RayTaskError):
        err = cause
        cause = getattr(err, "cause", None)
    return err
