"""Ray Data pipelines over shard sets: JPEG decode on CPU in ``map_batches``, leaving as uint8
with a seeded flip mask; the training loop normalises and flips on its device
(:func:`unibct_ray.training.device_images`).

Flips are seeded: image ``index`` in epoch ``e`` of a run with seed ``s`` is flipped iff the top
bit of a 64-bit hash of ``(s, e, index)`` is set (:func:`flip_mask`). A Ray Data map function
does not know the epoch (every epoch is a new execution of the same plan), so the training
loop publishes it on a small named actor (:func:`epoch_clock`) before each epoch; the decode
tasks read it. Ray Data starts an epoch's execution only when every training worker has asked
for it, and rank 0 sets the clock before it asks, so every decode task of that epoch reads the
new value. The flips then depend neither on how rows are batched nor on which worker decodes
them: two runs with one seed see the same flips, and a run resumed at epoch ``e`` sees the
flips an uninterrupted run saw there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray

from unibct_ray.data.images import decode_images, decode_uint8
from unibct_ray.data.shards import read_manifest

__all__ = ["read_shard_set", "decode_batch", "training_dataset", "FEATURE_COLUMN", "OLD_FEATURE_COLUMN", "FLIP_COLUMN",
           "feature_matrix", "flip_mask", "epoch_clock", "set_epoch_clock"]

FEATURE_COLUMN = "feature"
OLD_FEATURE_COLUMN = "old_feature"
FLIP_COLUMN = "flip"


def read_shard_set(path: str | os.PathLike, columns: list[str] | None = None, *,
                   task_cpus: float = 1.0) -> ray.data.Dataset:
    """A Ray Dataset over the Parquet files a manifest lists (validated first)."""
    m = read_manifest(path)
    return ray.data.read_parquet([str(f) for f in m.files], columns=columns, num_cpus=task_cpus)


def feature_matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list float column -> float32 [n, d] (no per-row Python)."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on ``uint64 [n]`` (wrapping arithmetic, as in C)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_mask(index: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``bool [n]``: flip record ``index[i]`` in ``epoch`` of a run seeded ``seed``.

    ``h = splitmix64(index XOR splitmix64(seed * 2^32 + epoch))`` (mod 2^64), flip iff the top bit of
    ``h`` is set: probability 1/2, a function of the record alone, new every epoch.
    """
    base = _splitmix64(np.array([((int(seed) << 32) + int(epoch)) & _MASK64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(index).astype(np.uint64) ^ base)
    return (h >> np.uint64(63)).astype(bool)


@ray.remote(num_cpus=0)
class _EpochClock:
    """The epoch of a training run, for its decode tasks (see the module docstring)."""

    def __init__(self) -> None:
        self._epoch = 0

    def set(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def get(self) -> int:
        return self._epoch


@contextlib.contextmanager
def epoch_clock() -> Iterator[str]:
    """A named epoch-clock actor for one training job, on the caller's node; yields its name
    (for :func:`training_dataset` and :func:`set_epoch_clock`) and removes it on exit."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"unibct-epoch-clock-{uuid.uuid4().hex[:16]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = _EpochClock.options(name=name, scheduling_strategy=here).remote()
    try:
        ray.get(actor.get.remote())  # started and registered before any task looks it up
        yield name
    finally:
        ray.kill(actor)


@functools.lru_cache(maxsize=32)
def _clock(name: str) -> "ray.actor.ActorHandle":
    """The clock's handle, looked up once per process (a decode task runs once per batch)."""
    return ray.get_actor(name)


def set_epoch_clock(name: str, epoch: int) -> None:
    """Publish ``epoch`` to the decode tasks; returns once the clock holds it."""
    ray.get(_clock(name).set.remote(epoch))


def decode_batch(batch: pa.Table, image_size: int, flip: bool, source: str, seed: int | None = None,
                 clock: str | None = None, uint8: bool = False) -> dict[str, np.ndarray]:
    """Ray Data batch (pyarrow) -> numpy columns: image, label, index (+ old_feature float32
    [b, d] when present).

    ``flip``: each image is mirrored with probability 1/2, by :func:`flip_mask` of its index,
    ``seed`` and the epoch on the ``clock`` actor when both are given, at random otherwise.
    ``uint8=False``: image is normalised float32 [b, 3, S, S], already flipped. ``uint8=True``:
    image is uint8 [b, 3, S, S] as decoded and the mask travels as a bool column ``flip`` [b]
    (all False without ``flip``), applied on the training device."""
    keys = batch.column("index").to_numpy()
    images = batch.column("image").to_pylist()
    mask = None
    if flip and seed is not None and clock is not None:
        mask = flip_mask(keys, seed, ray.get(_clock(clock).get.remote()))
    elif flip:
        mask = np.random.default_rng().random(len(images)) < 0.5
    if uint8:
        image = decode_uint8(images, image_size, keys=keys, source=source)
    else:
        image = decode_images(images, image_size, mask, keys=keys, source=source)
    out = {
        "image": image,
        "label": batch.column("label").to_numpy().astype(np.int64),
        "index": keys.astype(np.int64),
    }
    if uint8:
        out[FLIP_COLUMN] = mask if mask is not None else np.zeros(len(images), bool)
    if OLD_FEATURE_COLUMN in batch.column_names:
        out[OLD_FEATURE_COLUMN] = feature_matrix(batch, OLD_FEATURE_COLUMN)
    return out


# Shard sets up to this size are read by the driver instead of a Ray Data job (see
# training_dataset); the driver holds them once while they go to the object store.
DRIVER_READ_BYTES = 64 << 20


def _read_in_driver(files: list) -> ray.data.Dataset:
    import pyarrow.parquet as pq

    from unibct_ray.errors import DataFormatError

    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(str(f)))
        except (OSError, pa.ArrowException) as e:
            raise DataFormatError(f"{f}: not a readable Parquet shard ({e})") from e
    return ray.data.from_arrow(tables)


def training_dataset(path: str | os.PathLike, image_size: int, flip: bool = True,
                     decode_cpus: float = 1.0, batch_size: int = 256,
                     cache_bytes: int = 2_000_000_000, seed: int | None = None,
                     shuffle_blocks: bool = True, clock: str | None = None, uint8: bool = True) -> ray.data.Dataset:
    """Shards -> decoded, normalised, randomly flipped training rows (decoding in Ray Data).

    ``data convert`` stores rows in a seeded permutation; on top, blocks are read in a seeded
    order (``seed``) and the training loop shuffles rows within a buffer
    (``data.shuffle_buffer``). A streamed set is reordered by file, not by
    ``randomize_block_order``, so the first batch never waits for the whole set to be read.
    ``shuffle_blocks=False`` keeps the stored order (with no shuffle buffer: a reproducible run).

    A shard set smaller than ``cache_bytes`` is read once into the object store: every epoch
    is a new Ray Data execution, and re-listing and re-reading the files costs seconds per
    epoch (measured ~4 s here for 2 files), which dominates small runs. Sets up to
    ``DRIVER_READ_BYTES`` are read by the driver with pyarrow (one block per file), since a
    Ray Data read job alone costs ~6 s of start-up; larger ones are read by Ray Data. Larger
    than ``cache_bytes``, they stream from storage each epoch. ``uint8`` (the training path)
    leaves images as uint8 with a ``flip`` column (see :func:`decode_batch`); ``False`` keeps
    the float32 decode (the pipeline bench compares both). Decoding and flipping always
    run per epoch: with ``seed`` and an :func:`epoch_clock` ``clock`` the flips are a function of
    (seed, epoch, index), new each epoch and the same in every run; without, they are random.
    """
    m = read_manifest(path)
    size = sum(s.bytes for s in m.shards)
    if size <= min(cache_bytes, DRIVER_READ_BYTES):
        ds = _read_in_driver(m.files)
    elif size <= cache_bytes:
        ds = read_shard_set(path).materialize()
    else:
        files = [str(f) for f in m.files]
        if shuffle_blocks:
            # Streamed: the files in a seeded order instead of randomize_block_order, an
            # all-to-all step that would read the whole set before the first batch, every epoch.
            files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        ds = ray.data.read_parquet(files, num_cpus=1.0)
        shuffle_blocks = False
    if shuffle_blocks:  # blocks already in the object store: reordering them costs no read
        ds = ds.randomize_block_order(seed=seed)
    return ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={"image_size": image_size, "flip": flip, "source": str(path), "seed": seed, "clock": clock,
                   "uint8": uint8},
        num_cpus=decode_cpus,
    )
