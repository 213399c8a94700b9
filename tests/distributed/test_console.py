"""Ray's own driver-side lines go to the run's log file; the project's stay on the console."""

from __future__ import annotations

import logging
import os
import sys
import threading

from unibct_ray.distributed.console import ray_logs_to


def test_each_path_ray_writes_by_lands_in_the_log_and_is_put_back(tmp_path, capfd):
    log = tmp_path / "logs" / "ray.log"
    import ray.data  # noqa: F401  (Ray Data's console handler exists before the block, as in a run)

    stdout_before, stderr_before = sys.stdout, sys.stderr
    handlers_before = {name: list(logging.getLogger(name).handlers) for name in ("ray", "ray.data")}
    with ray_logs_to(log) as path:
        assert path == log
        logging.getLogger("ray").warning("core says %d", 1)           # Ray's Python logger
        logging.getLogger("ray.data").warning("data says 2")           # Ray Data's own console handler
        logging.getLogger("ray.data").debug("data debug")  # below what a console shows: Ray Data's session file only
        os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: C++ says 3\n")  # the core worker's sink
        relay = threading.Thread(target=lambda: print("(raylet) relay says 4"), name="ray_listen_error_messages")
        relay.start()
        relay.join()
        print("[demo] project says 5")
        print("unibct-ray: note: project says 6", file=sys.stderr)  # and Python's warnings: sys.stderr
    os.write(2, b"after says 9\n")

    assert (sys.stdout, sys.stderr) == (stdout_before, stderr_before)
    assert {name: list(logging.getLogger(name).handlers) for name in handlers_before} == handlers_before
    text = log.read_text()
    for what in ("core says 1", "data says 2", "C++ says 3", "relay says 4"):
        assert what in text, what
    out, err = capfd.readouterr()
    console = out + err
    for what in ("core says 1", "data says 2", "C++ says 3", "relay says 4"):
        assert what not in console, what
    assert "project says 5" in out and "project says 6" in err
    for what in ("project says", "after says", "data debug"):
        assert what not in text, what
    assert "after says 9" in err
