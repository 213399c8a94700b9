"""Connecting to Ray: a local instance by default, a cluster with ``--address``."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from typing import Any, Callable, Hashable, Iterator, Sequence

import ray

from unibct_ray.errors import UserError

__all__ = ["ensure_ray", "quiet_ray_data_console", "unwrap_task_error", "run_tasks", "spread_placement",
           "keep_sigint_handler"]


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Start (or connect to) Ray unless this process is already connected.

    ``address=None`` honours ``RAY_ADDRESS`` (set by ``ray job submit``) and otherwise starts a
    local instance. A local instance gets more logical CPUs than cores (at least 4): with exactly
    one per core, two 1-CPU train workers on a 2-core machine starve Ray Data's read tasks.
    """
    if quiet:
        quiet_ray_data_console()
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


def quiet_ray_data_console() -> None:
    """Ray Data's console log shows errors only (its INFO/WARNING lines, e.g. "Starting
    execution of Dataset ...", still go to the session's ``logs/ray-data`` file).

    The CLI's contract is one line per error; Ray Data's per-execution chatter would bury it.
    """
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.ERROR)


def unwrap_task_error(err: BaseException) -> BaseException:
    """The user's exception inside a ``RayTaskError`` (whose str() holds a remote traceback)."""
    cause = getattr(err, "cause", None)
    while cause is not None and isinstance(err, ray.exceptions.RayTaskError):
        err = cause
        cause = getattr(err, "cause", None)
    return err


def run_tasks(jobs: Sequence[tuple[Hashable, int, Callable[[], Any]]], *, desc: str, unit: str = "img",
              progress: bool = True, parallelism: int | None = None) -> dict:
    """Run ``(key, weight, submit)`` jobs (``submit()`` returns an ObjectRef) with at most
    ``parallelism`` in flight and a progress bar counting weights -> ``{key: result}``.

    The bar shows no ETA until the first wave of tasks (as many as run at once) is back, and
    then the mean rate since the start. The first tasks also pay the workers' start-up, so a
    small one returning first made a rate-based ETA read 36 minutes for a 7-second job.

    On the first failure the remaining tasks are cancelled and the user's exception (not
    Ray's wrapper with a remote traceback) is raised.
    """
    from tqdm.auto import tqdm

    limit = parallelism or len(jobs) or 1
    wave = max(1, min(limit, len(jobs), int(ray.cluster_resources().get("CPU", 1))))
    todo = list(jobs)[::-1]
    pending: dict = {}
    results: dict = {}
    bar = tqdm(total=sum(w for _, w, _ in jobs), unit=unit, desc=desc, disable=not progress, smoothing=0,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA after the first %d task%s]"
                          % (wave, "" if wave == 1 else "s"))
    try:
        while todo or pending:
            while todo and len(pending) < limit:
                key, weight, submit = todo.pop()
                pending[submit()] = (key, weight)
            done, _ = ray.wait(list(pending), num_returns=1)
            key, weight = pending.pop(done[0])
            results[key] = ray.get(done[0])
            if len(results) == wave:
                bar.bar_format = None  # tqdm's own: elapsed<remaining, rate
            bar.update(weight)
            if len(results) == wave:
                bar.refresh()
    except ray.exceptions.RayTaskError as err:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise unwrap_task_error(err) from None
    finally:
        bar.close()
    return results


@contextlib.contextmanager
def keep_sigint_handler() -> Iterator[None]:
    """Put back this process's Ctrl-C handler when the block ends.

    Ray Train's ``fit()`` installs a SIGINT handler (a graceful abort) that closes over its
    controller actor's handle and stays installed after ``fit()`` returns: the finished run's
    controller and its dataset split coordinator then live on, two idle worker processes,
    until the next ``fit()`` replaces the handler (through the evaluation after a training, or
    for the rest of the process). Restoring the handler drops that last handle, so Ray ends
    them when the fit returns. Off the main thread (a Tune trial) no handler is installed.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        # Should the fit's objects hold a controller handle inside a reference cycle, Ray could
        # end the actor only when the collector next ran; collect now.
        gc.collect()


@contextlib.contextmanager
def spread_placement(n: int, cpus: float = 1.0, resources: dict[str, float] | None = None) -> Iterator[list[Any]]:
    """``n`` scheduling strategies, one per bundle of a SPREAD placement group.

    The group places its bundles on distinct nodes as far as resources allow, decided at once
    (a per-actor ``scheduling_strategy="SPREAD"`` is a per-request heuristic that was seen to
    stack two actors on one node of two); on one machine every bundle lands there. Leaving
    the block removes the group, which ends the actors placed in it.
    ``resources`` (e.g. ``{"CPU": 1, "GPU": 0.25}``) replaces the ``{"CPU": cpus}`` bundle: an
    actor placed in a bundle may ask for no more than the bundle holds.
    """
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {k: float(v) for k, v in resources.items() if v} if resources else {"CPU": cpus}
    pg = placement_group([bundle] * n, strategy="SPREAD")
    try:
        yield [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i) for i in range(n)]
    finally:
        remove_placement_group(pg)

