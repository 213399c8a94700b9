"""Peak memory of the training input pipeline when an epoch is many times the object store.

``python -m unibct_ray.bench.memory --out DIR --images 60000 --object-store-mb 256``

Writes a shard set of ``--images`` 112 px JPEGs (64 distinct images, repeated) unless ``DIR``
already holds one, starts a local Ray with the given object store, streams one epoch through
``training_dataset`` (decode + normalise + flip, the training code path, ``cache_bytes=0``) to a
consumer slower than decoding (``--consumer-ms`` per batch of 128, like a trainer), and samples
every 0.25 s the proportional set size (PSS: shared pages split between the processes that map
them) of this driver, the raylet and every process the raylet started. Prints the peak, the
largest processes at the peak and the decoded bytes of the epoch. A bounded pipeline shows the
same peak for 2x the images.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _write_shards(out: Path, n: int) -> Path:
    """``n`` rows of 112 px JPEGs (64 distinct), 50 per class, 5,000 per file."""
    from unibct_ray.bench.common import jpeg_shards

    return jpeg_shards(out / "shards", n, size=112, distinct=64, per_class=50, rows_per_shard=5000)


def _pss_by_process(raylet: int) -> dict[str, int]:
    pids = [os.getpid(), raylet]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == raylet:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")[:40]
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        out[f"{pid} {title}"] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="work directory (the shard set is kept there)")
    p.add_argument("--images", type=int, default=60_000)
    p.add_argument("--object-store-mb", type=int, default=256)
    p.add_argument("--consumer-ms", type=float, default=50.0, help="time the consumer spends per batch of 128")


def run(a: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    src = _write_shards(a.out, a.images)

    import ray

    from unibct_ray.distributed.data import training_dataset

    ray.init(num_cpus=4, object_store_memory=a.object_store_mb << 20, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def parent() -> int:
        return os.getppid()

    raylet = ray.get(parent.remote())
    baseline = sum(_pss_by_process(raylet).values())
    peak, at_peak, stop = [0], [{}], threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            parts = _pss_by_process(raylet)
            if sum(parts.values()) > peak[0]:
                peak[0], at_peak[0] = sum(parts.values()), parts

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, n = time.perf_counter(), 0
    for batch in training_dataset(str(src), 112, True, cache_bytes=0).iter_torch_batches(batch_size=128):
        n += len(batch["label"])
        time.sleep(a.consumer_ms / 1000)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ray.shutdown()
    result = {"images": n, "decoded_bytes": n * 3 * 112 * 112 * 4, "object_store_bytes": a.object_store_mb << 20,
              "baseline_pss_bytes": baseline, "peak_pss_bytes": peak[0], "seconds": round(seconds, 1),
              "largest_at_peak": {k: v for k, v in sorted(at_peak[0].items(), key=lambda kv: -kv[1])[:6]}}
    return result


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("memory", __doc__, add_arguments, run)
