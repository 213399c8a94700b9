"""Training rows reach the loop shuffled: shard sets are written in class order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from unibct_ray.data.shards import shard_name, write_manifest, write_shard
from unibct_ray.distributed.data import training_dataset


def _class_ordered_shards(path, classes: int = 20, per_class: int = 16, rows_per_shard: int = 40) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    table = pa.table({"image": [buf.getvalue()] * len(labels), "label": labels,
                      "index": np.arange(len(labels), dtype=np.int64)})
    path.mkdir(parents=True)
    infos = [write_shard(path / shard_name(i), table.slice(s, rows_per_shard))
             for i, s in enumerate(range(0, len(labels), rows_per_shard))]
    write_manifest(path, infos, rows=len(labels), classes=classes, columns=table.column_names)
    return labels


def _first_epoch_labels(path, seed: int, buffer: int) -> np.ndarray:
    ds = training_dataset(str(path), 8, flip=False, seed=seed)
    out = [b["label"].numpy() for b in ds.iter_torch_batches(batch_size=32, local_shuffle_buffer_size=buffer,
                                                              local_shuffle_seed=seed)]
    return np.concatenate(out)


def test_batches_mix_classes(ray_session, tmp_path):
    labels = _class_ordered_shards(tmp_path / "shards")
    a = _first_epoch_labels(tmp_path / "shards", seed=1, buffer=1024)
    c = _first_epoch_labels(tmp_path / "shards", seed=2, buffer=1024)
    assert sorted(a.tolist()) == sorted(labels.tolist())  # every row once
    assert not np.array_equal(a, c)
    # In class order a batch of 32 holds 2 classes; shuffled, about 16 of the 20.
    per_batch = [len(np.unique(a[i:i + 32])) for i in range(0, len(a) - 31, 32)]
    assert min(per_batch) >= 8, per_batch
