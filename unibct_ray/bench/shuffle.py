"""``unibct-ray bench shuffle``: how class-mixed the training loop's batches are.

A class-ordered ``.rec`` (tiny images: the order is measured, not the decode) is converted
twice, in record order and in the default seeded permutation; one epoch of each is read the
way the training loop reads it (``training_dataset`` with its seeded block order, then
``iter_torch_batches`` with the per-worker shuffle buffer), and the mean number of distinct
classes per global batch is compared with a uniform random permutation of the same labels.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["bench_shuffle", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "distinct classes per global batch: stored order + epoch shuffle vs a uniform permutation"
#: The subcommand's description.
DESCRIPTION = (
    "Mean distinct classes per global batch of one training epoch, for shards in record\n"
    "(class) order and in the converter's seeded permutation, against a uniform random\n"
    "permutation of the same labels (the goal: >= 0.95x of it)."
)


def _distinct_per_batch(labels: np.ndarray, batch: int) -> float:
    n = len(labels) // batch
    return float(np.mean([len(np.unique(labels[i * batch:(i + 1) * batch])) for i in range(n)]))


def _epoch_labels(shards: Path, batch: int, buffer: int, seed: int) -> tuple[np.ndarray, float]:
    from unibct_ray.distributed.data import training_dataset

    t = time.perf_counter()
    ds = training_dataset(str(shards), 16, flip=False, seed=seed, shuffle_blocks=True)
    shuffle = {"local_shuffle_buffer_size": buffer, "local_shuffle_seed": seed} if buffer else {}
    out = [b["label"].numpy() for b in ds.iter_torch_batches(batch_size=batch, drop_last=True, **shuffle)]
    return np.concatenate(out), time.perf_counter() - t


def bench_shuffle(classes: int = 2000, per_class: int = 20, batch: int = 512, buffer: int = 4096,
                  rows_per_shard: int = 2000, seed: int = 0) -> dict:
    from PIL import Image

    from unibct_ray.data.ms1m import write_ms1m
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray

    ensure_ray()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    labels = np.repeat(np.arange(classes), per_class)
    uniform = _distinct_per_batch(np.random.default_rng(seed + 1).permutation(labels), batch)
    out: dict = {"classes": classes, "rows": int(len(labels)), "global_batch": batch, "shuffle_buffer": buffer,
                 "rows_per_shard": rows_per_shard, "uniform_permutation_distinct_per_batch": round(uniform, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "train.rec"
        write_ms1m(rec, [(int(c), buf.getvalue()) for c in labels])
        for name, order_seed in (("record_order", None), ("permuted", seed)):
            shards = Path(tmp) / name
            convert_rec(rec, shards, rows_per_shard=rows_per_shard, progress=False, shuffle_seed=order_seed)
            got, wall = _epoch_labels(shards, batch, buffer, seed)
            d = _distinct_per_batch(got, batch)
            out[name] = {"distinct_per_batch": round(d, 1), "ratio_to_uniform": round(d / uniform, 3),
                         "epoch_read_s": round(wall, 2)}
    out["note"] = ("one worker reading the whole epoch (per-worker batch = global batch); "
                   "record_order relies on the block order + shuffle buffer alone")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--per-class", type=int, default=20, help="images per class")
    p.add_argument("--batch", type=int, default=512, help="global batch")
    p.add_argument("--buffer", type=int, default=4096, help="shuffle buffer (data.shuffle_buffer)")
    p.add_argument("--rows-per-shard", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)


def run(a: argparse.Namespace) -> dict:
    return bench_shuffle(a.classes, a.per_class, a.batch, a.buffer, a.rows_per_shard, a.seed)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("shuffle", __doc__, add_arguments, run)
