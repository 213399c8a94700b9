"""``data convert``: an MS1M ``.rec`` -> Parquet shard set, as parallel Ray tasks over key ranges.

On a cluster the ``.rec``/``.idx`` and the output directory must sit on a file system every
node sees (NFS, a mounted bucket): each task maps the ``.rec`` and writes its own shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from unibct_ray.data import ms1m
from unibct_ray.data.convert import RangeResult, convert_range, plan_ranges
from unibct_ray.data.recordio import RecordIOReader
from unibct_ray.data.shards import Manifest, StagedDir, read_manifest, shard_name, write_manifest
from unibct_ray.distributed.runtime import run_tasks
from unibct_ray.errors import DataFormatError, UserError

__all__ = ["convert_rec"]


@ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)
def _convert_task(reader: RecordIOReader, out_path: str, verify: str) -> RangeResult:
    with reader:
        return convert_range(reader, reader.keys, Path(out_path), verify)


def _synth_origin(rec: Path) -> dict:
    """``{"synth": settings}`` when a ``synth.json`` sits beside the ``.rec`` (else empty):
    a shard set then says which label noise / outliers / class-size law it was rendered with."""
    path = rec.resolve().parent / "synth.json"
    if not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: not a data synth settings file ({e})") from e
    keys = ("identities", "images_per_identity", "count_spread", "seed", "size", "strength",
            "label_noise", "outliers", "long_tail")
    return {"synth": {k: spec.get(k, 0.0) for k in keys}}


def convert_rec(
    rec: str | os.PathLike,
    out: str | os.PathLike,
    *,
    idx: str | os.PathLike | None = None,
    rows_per_shard: int = 50_000,
    verify: str = "signature",
    overwrite: bool = False,
    progress: bool = True,
    parallelism: int | None = None,
    connect: Callable[[], None] | None = None,
    shuffle_seed: int | None = 0,
) -> Manifest:
    """Convert an MS1M-layout ``.rec`` into a shard set at ``out`` (atomically).

    Requires a connected Ray (see ``ensure_ray``). Rows are written in a seeded permutation of
    the image keys (``numpy.random.default_rng(shuffle_seed).permutation``), so every shard and
    every block a training epoch reads holds many classes (a ``.rec`` is in class order:
    record-order shards give batches of a few hundred of the classes). ``shuffle_seed=None``
    keeps the record order. ``data split`` defines "first images" by the ``index`` column
    (record keys), not by row position, so it gives the same split either way. ``parallelism``
    bounds the tasks in flight (default: the cluster's CPUs). ``connect`` is called once the
    ``.rec``/``.idx`` framing, header and keys are checked (before any Ray work).
    """
    reader = RecordIOReader(rec, idx)
    with reader:
        header = ms1m.read_ms1m_header(reader)
        keys = ms1m.image_keys(reader, header)
    if shuffle_seed is not None:
        keys = keys[np.random.default_rng(shuffle_seed).permutation(len(keys))]
    ranges = plan_ranges(len(keys), rows_per_shard)
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    if connect is not None:
        connect()
    if parallelism is None:
        parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
    with StagedDir(out, overwrite=overwrite) as stage:
        jobs = [(i, e - s, lambda i=i, s=s, e=e: _convert_task.remote(
                    reader.subset(keys[s:e]), str(stage.path / shard_name(i)), verify))
                for i, (s, e) in enumerate(ranges)]
        results: dict[int, RangeResult] = run_tasks(jobs, desc="convert", progress=progress,
                                                    parallelism=parallelism)
        shards = [results[i].shard for i in range(len(ranges))]
        labels = np.unique(np.concatenate([r.labels for r in results.values()])) if results else np.zeros(0)
        write_manifest(
            stage.path,
            shards,
            rows=len(keys),
            classes=len(labels),
            columns=["image", "label", "index"],
            label_max=int(labels.max()) if len(labels) else -1,
            source={
                "rec": str(Path(rec).resolve()),
                "idx": str(reader.idx_path.resolve()),
                "rec_bytes": reader.size,
                "header": [header.image_end, header.second],
                **_synth_origin(Path(rec)),
            },
            verify=verify,
            order={"shuffle_seed": shuffle_seed} if shuffle_seed is not None else "record",
        )
        final = stage.commit()
    return read_manifest(final)
