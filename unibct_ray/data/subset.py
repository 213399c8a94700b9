"""The first rows of a shard set as a new, small shard set (what a job's ``--smoke-test`` trains on).

``data convert`` writes classes mixed (a seeded permutation; ``--record-order`` keeps class
order) and ``data split`` keeps its source's row order, so the first ``rows`` rows are a sample
of many classes, or, in class order, whole classes and the start of one more. Either way the
subset's ``label`` is renumbered ``0..k-1`` over the classes it holds (in increasing id order:
the identity for a class-ordered set). Every other column is kept, ``source_label`` included, so
the subset runs the same loaders, the same old/new class matching and the same training code as
the full set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unibct_ray.data.shards import Manifest, StagedDir, read_manifest, shard_name, write_manifest, write_shard
from unibct_ray.errors import DataFormatError, UserError

__all__ = ["take_rows"]


def take_rows(src: str | os.PathLike, dst: str | os.PathLike, rows: int, *, overwrite: bool = False) -> Manifest:
    """Write the first ``rows`` rows of shard set ``src`` (all of it if smaller) to ``dst``.

    Reads row group by row group and stops once ``rows`` are in hand, so a subset of a 20 GB
    set costs its own size. ``dst`` holds one shard; its manifest has ``classes = max label + 1``
    and records where the rows came from. Atomic, like every shard-set writer.
    """
    if rows < 1:
        raise UserError(f"take_rows: rows must be >= 1, got {rows}")
    m = read_manifest(src)
    parts: list[pa.Table] = []
    n = 0
    for f in m.files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            parts.append(t.slice(0, rows - n))
            n += parts[-1].num_rows
            if n >= rows:
                break
        if n >= rows:
            break
    table = pa.concat_tables(parts)
    labels = table.column("label").to_numpy()
    if len(labels) and labels.min() < 0:
        raise DataFormatError(f"{m.path}: negative label {int(labels.min())} in the first {n} rows")
    classes, dense = np.unique(labels, return_inverse=True)
    table = table.set_column(table.column_names.index("label"), "label", pa.array(dense.astype(np.int64)))
    with StagedDir(dst, overwrite=overwrite) as stage:
        info = write_shard(stage.path / shard_name(0), table)
        write_manifest(stage.path, [info], rows=table.num_rows, classes=len(classes),
                       columns=list(table.column_names), subset={"source": str(m.path), "first_rows": n})
        stage.commit()
    return read_manifest(dst)
