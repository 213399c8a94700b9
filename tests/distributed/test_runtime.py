"""Running weighted Ray tasks behind one progress bar (``run_tasks``)."""

from __future__ import annotations

import time

import ray

from unibct_ray.distributed.runtime import run_tasks


@ray.remote(num_cpus=1)
def _sleep(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def test_no_eta_until_the_first_wave_is_back(ray_session, capsys):
    # A 1-image task returns first (as the one training identity of a validation-set synth
    # did); a rate from it alone says minutes for what takes a second.
    jobs = [("tiny", 1, lambda: _sleep.remote(0.3, 1)), ("big", 100, lambda: _sleep.remote(1.2, 2)),
            ("next", 100, lambda: _sleep.remote(0.4, 3))]
    assert run_tasks(jobs, desc="t", parallelism=2) == {"tiny": 1, "big": 2, "next": 3}
    frames = [f.strip() for f in capsys.readouterr().err.split("\r") if f.strip().startswith("t:")]
    first = [f for f in frames if " 1/201 " in f]
    assert first and all("ETA after the first 2 tasks" in f and "<" not in f for f in first), frames
    assert "201/201" in frames[-1] and "<00:00" in frames[-1], frames
