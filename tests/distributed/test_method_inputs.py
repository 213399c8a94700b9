"""The driver's once-per-run inputs of advbct and mixbct, streamed from an old-feature shard set,
equal the same computation on the whole matrix in memory."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from unibct_ray.compat.advbct import inlier_radius
from unibct_ray.compat.class_geometry import class_centres, distances_to_centres
from unibct_ray.compat.mixbct import credible_mask
from unibct_ray.data.shards import shard_name, write_manifest, write_shard
from unibct_ray.distributed.data import OLD_FEATURE_COLUMN
from unibct_ray.distributed.method_inputs import METHOD_INPUT_FILES, write_method_inputs


def old_feature_shards(path, old: np.ndarray, labels: np.ndarray, index: np.ndarray, files: int = 3) -> None:
    """A feature shard set of ``files`` Parquet files, rows in the given (class-mixed) order."""
    path.mkdir(parents=True)
    infos = []
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
        flat = pa.array(old[rows].astype(np.float32).ravel(), pa.float32())
        table = pa.table({"label": pa.array(labels[rows], pa.int64()), "index": pa.array(index[rows], pa.int64()),
                          OLD_FEATURE_COLUMN: pa.FixedSizeListArray.from_arrays(flat, old.shape[1])})
        infos.append(write_shard(path / shard_name(i), table))
    write_manifest(path, infos, rows=len(labels), classes=int(labels.max()) + 1, columns=table.column_names)


def test_streamed_inputs_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(0)
    n, c, d = 90, 6, 8
    labels = rng.integers(0, c, n)
    old = (rng.normal(size=(n, d)) + 3 * np.eye(c, d)[labels]).astype(np.float32)
    index = rng.permutation(1000)[:n] + 1
    old_feature_shards(tmp_path / "feats", old, labels, index)
    centres, counts = class_centres(old, labels, c)
    dist = distances_to_centres(old, labels, centres)

    cfg = SimpleNamespace(name="t", compat=SimpleNamespace(method="mixbct", mixbct_credible=0.9))
    path = write_method_inputs(cfg, tmp_path, str(tmp_path / "feats"), c)
    assert path.endswith(METHOD_INPUT_FILES["mixbct"])
    with np.load(path) as z:
        np.testing.assert_array_equal(z["credible_index"], np.sort(index[credible_mask(dist, labels, 0.9)]))

    cfg.compat.method = "advbct"
    with np.load(write_method_inputs(cfg, tmp_path, str(tmp_path / "feats"), c)) as z:
        r_max, sizes = inlier_radius(dist, labels, c)
        np.testing.assert_allclose(z["centres"], centres, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(z["r_max"], r_max, rtol=1e-6)
        np.testing.assert_array_equal(z["counts"], counts)

    cfg.compat.method = "nccl"  # nothing to precompute
    assert write_method_inputs(cfg, tmp_path, str(tmp_path / "feats"), c) is None
