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
