"""Shared fixtures: one local Ray for the whole session (start-up costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


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
    """A function listing the session raylet's worker processes by title (``ray::IDLE``,
    ``ray::TrainController.run``, ...), read from /proc: what the operating system sees, not
    what Ray reports. The raylet is a child of this process (the fixture's ``ray.init``)."""
    from pathlib import Path

    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        pytest.skip("needs /proc")

    def children(ppid: int) -> list[tuple[int, str]]:
        out = []
        for p in proc.iterdir():
            if not p.name.isdigit():
                continue
            try:
                stat = (p / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append((int(p.name), (p / "cmdline").read_text().split("\0")[0]))
            except (OSError, ValueError, IndexError):
                pass  # a process that ended while being read
        return out

    raylets = [pid for pid, cmd in children(os.getpid()) if cmd.endswith("/raylet")]
    assert len(raylets) == 1, f"expected one raylet child of the test process, found {raylets}"
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # the node's agents, not pool workers

    def workers() -> list[str]:
        return sorted(cmd for _, cmd in children(raylets[0]) if not cmd.startswith(agents))

    return workers
