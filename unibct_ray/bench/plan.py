"""The plan's memory estimates against measured processes: one train worker, one extraction actor.

``python -m unibct_ray.bench.plan --out DIR [--backbone r18 --batch 16 --steps 6]``

Writes a small shard set of 112 px JPEGs, trains it on the real path (``train``: Ray Data
decode -> one Ray Train worker, r18 by default) for a few steps, then extracts features with
the trained checkpoint on one extraction actor (``extract_features``) from a second set of four
full extraction batches (one actor gets four pieces of one batch each: the activations the
estimate counts for a full batch are really allocated). A sampler polls every
0.2 s the processes the raylet started and keeps, per process, the peak resident set (RSS)
and unique set (USS: pages no other process maps). Prints, for the train worker and the
extraction actor, the estimate of :func:`unibct_ray.plan.train_worker_memory` /
:func:`unibct_ray.plan.extract_actor_memory`, the measured peaks and their ratios.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _write_shards(out: Path, rows: int, classes: int, size: int) -> Path:
    """``rows`` rows of JPEGs (32 distinct) over at most ``classes`` classes, in one file."""
    from unibct_ray.bench.common import jpeg_shards

    per_class = -(-rows // classes)  # ceil: the last class may be short, never one too many
    return jpeg_shards(out / f"shards-{rows}-{size}", rows, size=size, distinct=32, per_class=per_class,
                       rows_per_shard=rows)


class _Sampler:
    """Peak RSS and USS of every process the raylet started, by pid (with its title)."""

    def __init__(self, raylet: int, every: float = 0.2):
        import psutil

        self.raylet = psutil.Process(raylet)
        self.every = every
        self.peaks: dict[int, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self.stop.wait(self.every):
            for p in self.raylet.children():
                try:
                    title = " ".join(p.cmdline())[:80]
                    m = p.memory_full_info()
                except (psutil.Error, OSError):
                    continue
                peak = self.peaks.setdefault(p.pid, {"title": title, "rss": 0, "uss": 0})
                peak["title"] = title if "::" in title else peak["title"]
                peak["rss"], peak["uss"] = max(peak["rss"], m.rss), max(peak["uss"], m.uss)

    def __enter__(self) -> "_Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def peak(self, *needles: str) -> dict:
        """The largest-RSS process whose title holds one of ``needles``."""
        hits = [v | {"pid": k} for k, v in self.peaks.items() if any(n in v["title"] for n in needles)]
        return max(hits, key=lambda v: v["rss"]) if hits else {"title": "not seen", "rss": 0, "uss": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="work directory (shards and the run are kept there)")
    p.add_argument("--backbone", default="r18", help="backbone of the run")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16, help="global batch = per-worker batch (one worker)")
    p.add_argument("--steps", type=int, default=4, help="training steps (one epoch)")
    p.add_argument("--classes", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--extract-batch", type=int, default=64)


def run(a: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import shutil

    import ray

    from unibct_ray.config import from_dict
    from unibct_ray.plan import extract_actor_memory, train_worker_memory

    rows = a.batch * a.steps
    src = _write_shards(a.out, rows, a.classes, a.image_size)
    ext_rows = 4 * a.extract_batch  # four pieces of one full batch on one actor (plan_pieces)
    ext_src = _write_shards(a.out, ext_rows, a.classes, a.image_size)
    storage = (a.out / "runs").resolve()
    shutil.rmtree(storage, ignore_errors=True)
    cfg = from_dict({"name": "bench-plan", "storage": str(storage), "num_workers": 1, "cpus_per_worker": 1,
                     "global_batch": a.batch, "use_gpu": False, "extract_actors": 1, "extract_batch": a.extract_batch,
                     "data": {"train": str(src.resolve()), "image_size": a.image_size, "shuffle_buffer": a.shuffle_buffer},
                     "model": {"backbone": a.backbone}, "optim": {"epochs": 1}}, "bench plan")
    # The workers import the project through PYTHONPATH when it is not installed.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        from unibct_ray.distributed.extract import extract_features
        from unibct_ray.distributed.train import train

        @ray.remote(num_cpus=0)
        def parent() -> int:
            return os.getppid()

        raylet = ray.get(parent.remote())
        with _Sampler(raylet) as s:
            t0 = time.perf_counter()
            res = train(cfg)
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            extract_features(str(ext_src), a.out / "features", checkpoint=res.checkpoint, actors=1,
                             batch_size=cfg.extract_batch, overwrite=True)
            t_extract = time.perf_counter() - t0
        worker, actor = s.peak("TrainWorker", "RayTrainWorker"), s.peak("PieceEmbedder")
    finally:
        ray.shutdown()

    def side(est: int, got: dict) -> dict:
        return {"estimate_bytes": est, "peak_rss_bytes": got["rss"], "peak_uss_bytes": got["uss"],
                "estimate_over_rss": round(est / got["rss"], 3) if got["rss"] else None,
                "estimate_over_uss": round(est / got["uss"], 3) if got["uss"] else None,
                "process": got["title"]}

    w_est = train_worker_memory(cfg, a.classes)
    x_est = extract_actor_memory(cfg)
    return {"backbone": a.backbone, "image_size": a.image_size, "per_worker_batch": a.batch, "steps": a.steps,
            "extract_batch": a.extract_batch, "train_s": round(t_train, 1), "extract_s": round(t_extract, 1),
            "extract_rows": ext_rows,
            "train_worker": side(w_est.host, worker), "train_worker_parts": w_est.parts,
            "extraction_actor": side(x_est.host, actor), "extraction_actor_parts": x_est.parts}


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("plan", __doc__, add_arguments, run)
