"""Seeded flips: a function of (seed, epoch, record index), read from the epoch clock by the
Ray Data decode tasks."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from unibct_ray.data.shards import shard_name, write_manifest, write_shard
from unibct_ray.distributed.data import decode_batch, epoch_clock, flip_mask, set_epoch_clock, training_dataset
from unibct_ray.training import device_images

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on one Python int (explicit mod 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def reference_flip(index: int, seed: int, epoch: int) -> bool:
    base = splitmix64(((seed << 32) + epoch) & M64)
    return splitmix64(index ^ base) >> 63 == 1


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (7, 3), (2**31 - 1, 34)])
def test_flip_mask_matches_a_scalar_reference(seed, epoch):
    index = np.concatenate([np.arange(300), [5_179_509, 2**40 + 3]]).astype(np.int64)
    got = flip_mask(index, seed, epoch)
    assert got.dtype == bool and got.shape == index.shape
    assert got.tolist() == [reference_flip(int(i), seed, epoch) for i in index]


def test_flip_mask_is_per_record_and_new_each_epoch():
    index = np.arange(4000)
    m0, m1 = flip_mask(index, 5, 0), flip_mask(index, 5, 1)
    # A record's flip does not depend on its batch: any subset, in any order, gives its rows.
    sub = np.random.default_rng(0).permutation(4000)[:137]
    assert np.array_equal(flip_mask(index[sub], 5, 0), m0[sub])
    # Half the records flip (binomial sd 0.008; 6 sd bounds), and about half of them change
    # between epochs and between seeds.
    assert 0.45 < m0.mean() < 0.55
    assert 0.45 < (m0 != m1).mean() < 0.55
    assert 0.45 < (m0 != flip_mask(index, 6, 0)).mean() < 0.55


def _asymmetric_shards(path, n: int = 40, size: int = 16) -> np.ndarray:
    """``n`` JPEGs whose left and right halves differ, in shards of 16 rows; returns the indexes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:, : size // 2] = rng.integers(100, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        images.append(buf.getvalue())
    index = np.arange(1000, 1000 + n, dtype=np.int64)
    table = pa.table({"image": images, "label": np.arange(n, dtype=np.int64) // 4, "index": index})
    path.mkdir(parents=True)
    infos = [write_shard(path / shard_name(i), table.slice(s, 16)) for i, s in enumerate(range(0, n, 16))]
    write_manifest(path, infos, rows=n, classes=n // 4, columns=table.column_names)
    return index


def test_decode_tasks_flip_by_the_epoch_on_the_clock(ray_session, tmp_path):
    import pyarrow.parquet as pq

    index = _asymmetric_shards(tmp_path / "shards")
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "shards").glob("*.parquet"))])
    plain = decode_batch(table, 16, False, "test")["image"]
    assert not np.array_equal(plain, plain[..., ::-1])  # the flip is visible

    def expected(seed: int, epoch: int) -> np.ndarray:
        mask = np.array([reference_flip(int(i), seed, epoch) for i in index])
        return np.where(mask[:, None, None, None], plain[..., ::-1], plain)

    with epoch_clock() as clock:
        for epoch in (0, 3):
            set_epoch_clock(clock, epoch)
            # Ray Data tasks, batches of 8 over blocks of 16 (the stored order: no block shuffle).
            ds = training_dataset(str(tmp_path / "shards"), 16, flip=True, batch_size=8, seed=7,
                                  shuffle_blocks=False, clock=clock)
            rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
            raw = np.concatenate([r["image"] for r in rows])
            assert raw.dtype == np.uint8  # decoded images travel as uint8; the loop normalises
            got = device_images(torch.from_numpy(raw), torch.from_numpy(np.concatenate([r["flip"] for r in rows]))).numpy()
            assert np.array_equal(np.concatenate([r["index"] for r in rows]), index)
            np.testing.assert_array_equal(got, expected(7, epoch))
        assert not np.array_equal(expected(7, 0), expected(7, 3))
