"""Shared fixtures: one local Ray for the whole session (start-up costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Sweeps sign their experiment directories: with a key from the environment no test creates
# ~/.config/unibct-ray/tune.key in the home of whoever runs the suite.
os.environ.setdefault("UNIBCT_RAY_TUNE_KEY", "test-suite-tune-key-0123456789abcdef")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 4 logical CPUs (more than the 2 cores: see ARCHITECTURE §8)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors: one OpenMP thread avoids barrier stalls on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="session")
def ray_worker_processes(ray_session):
    """A function -> ``{pid: process title}`` of the session raylet's child processes (its
    workers: ``ray::IDLE``, ``ray::TrainController.run``, ...; and its two agents), read from
    /proc: what the operating system sees, not what Ray reports. Never another Ray's."""
    from pathlib import Path

    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        pytest.skip("needs /proc")

    @ray_session.remote(num_cpus=0)
    def parent() -> int:
        return os.getppid()  # a worker process is a child of its raylet

    raylet = ray_session.get(parent.remote())

    def processes() -> dict[int, str]:
        found = {}
        for p in proc.iterdir():
            if not p.name.isdigit():
                continue
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                    found[int(p.name)] = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (OSError, ValueError, IndexError):
                pass  # a process that ended while being read
        return found

    return processes
