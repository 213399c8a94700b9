"""What advbct and mixbct read in the training loop, computed once per run in the driver from
the cached old features of the training set (``STORAGE/old_features/<key>/``, the same files
l2/bct/unibct read):

* advbct: each class's centre of the normalised old features ``[C, d]``, its inlier radius
  ``r_max [C]`` and its size ``[C]`` (:func:`unibct_ray.compat.advbct.inlier_radius`);
* mixbct: the sorted record indices of the credible samples
  (:func:`unibct_ray.compat.mixbct.credible_mask`).

The shard set is streamed file by file, twice (class sums, then each row's distance to its
class centre): the driver holds one file's features, the per-class sums and three numbers per
row, never the feature matrix. No Ray calls; it lives beside the loop that reads its output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from unibct_ray.compat.class_geometry import centres_from_sums, distances_to_centres, normalize_rows
from unibct_ray.compat.prototypes import partial_class_sums
from unibct_ray.data.shards import read_manifest
from unibct_ray.distributed.data import OLD_FEATURE_COLUMN, feature_matrix

__all__ = ["METHOD_INPUT_FILES", "old_feature_geometry", "write_method_inputs"]

METHOD_INPUT_FILES = {"advbct": "advbct-classes.npz", "mixbct": "mixbct-credible.npz"}


def old_feature_geometry(path: str | os.PathLike, column: str, num_classes: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A feature shard set -> (record index ``[n]``, label ``[n]``, distance of each normalised
    row to its class centre ``[n]``, centres ``[C, d]`` float64, class sizes ``[C]``)."""
    m = read_manifest(path)
    sums = counts = None
    for f in m.files:
        t = pq.read_table(f, columns=["label", column])
        s, c = partial_class_sums(normalize_rows(feature_matrix(t, column)),
                                  t.column("label").to_numpy().astype(np.int64), num_classes)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    if sums is None:
        raise ValueError(f"{path}: the shard set lists no files")
    centres, sizes = centres_from_sums(sums, counts)
    index, labels, dist = [], [], []
    for f in m.files:
        t = pq.read_table(f, columns=["index", "label", column])
        y = t.column("label").to_numpy().astype(np.int64)
        index.append(t.column("index").to_numpy().astype(np.int64))
        labels.append(y)
        dist.append(distances_to_centres(feature_matrix(t, column), y, centres))
    return np.concatenate(index), np.concatenate(labels), np.concatenate(dist), centres, sizes


def write_method_inputs(cfg: Any, run_dir: Path, train_dir: str, num_classes: int) -> str | None:
    """Write ``run_dir/<METHOD_INPUT_FILES[method]>`` for advbct / mixbct and return its path
    (None for the other methods). ``train_dir``: the old-feature shard set. Written whole or not
    at all; a resumed run writes the same file again from the same features."""
    method = cfg.compat.method
    if method not in METHOD_INPUT_FILES:
        return None
    index, labels, dist, centres, sizes = old_feature_geometry(train_dir, OLD_FEATURE_COLUMN, num_classes)
    if method == "mixbct":
        from unibct_ray.compat.mixbct import credible_mask

        keep = credible_mask(dist, labels, cfg.compat.mixbct_credible)
        arrays = {"credible_index": np.sort(index[keep])}
        what = f"{int(keep.sum())} of {keep.size} samples credible (T = {cfg.compat.mixbct_credible:g})"
    else:
        from unibct_ray.compat.advbct import inlier_radius

        r_max, sizes = inlier_radius(dist, labels, num_classes)
        arrays = {"centres": centres.astype(np.float32), "r_max": r_max.astype(np.float32), "counts": sizes}
        what = f"{int((sizes >= 2).sum())} of {num_classes} classes with a radius"
    out = Path(run_dir) / METHOD_INPUT_FILES[method]
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    print(f"[{cfg.name}] {method}: {what} -> {out.name}", flush=True)
    return str(out.resolve())
