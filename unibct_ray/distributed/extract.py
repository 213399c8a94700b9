"""Feature extraction over a shard set on a Ray actor pool (the model is loaded once per actor).

Output is a shard set keyed by record ``index``: ``index``, ``label`` (+ ``source_label`` when
present), and the feature column (fixed-size list of float32). With ``keep_images`` the
``image`` column is carried along, giving a training set whose rows hold their old-model
features (what the l2 loss consumes).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from unibct_ray.data.images import decode_images
from unibct_ray.data.shards import ShardInfo, StagedDir, read_manifest, write_manifest
from unibct_ray.distributed.data import FEATURE_COLUMN, read_shard_set

__all__ = ["Embedder", "extract_features"]


class Embedder:
    """Callable class for ``map_batches``: decode (no flip) -> backbone -> feature column.

    ``use_gpu``: the actor was given a GPU share (``num_gpus`` of the pool), so the backbone
    runs there under fp16 autocast (:class:`unibct_ray.inference.DeviceEmbedder`); otherwise
    on the CPU in float32 with ``threads`` intra-op threads (the whole CPUs the actor holds).
    """

    def __init__(self, checkpoint: str, column: str, keep_images: bool, image_size: int | None = None,
                 weights_path: str = "", use_gpu: bool = False, threads: int = 1):
        from unibct_ray.inference import DeviceEmbedder

        if checkpoint:
            from unibct_ray.checkpoint import build_backbone_from_checkpoint

            model, cfg, _ = build_backbone_from_checkpoint(checkpoint)
            self.size = image_size or cfg.data.image_size
        else:  # the live run's weights, from the file extract_features wrote for this pass
            import torch

            from unibct_ray.models.iresnet import build_backbone

            saved = torch.load(weights_path, map_location="cpu", weights_only=True)
            model = build_backbone(**saved["model_spec"])
            model.load_state_dict(saved["state_dict"])
            self.size = image_size or saved["model_spec"]["input_size"]
        self.embedder = DeviceEmbedder([model], use_gpu=use_gpu, threads=threads)
        self.column = column
        self.keep_images = keep_images

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("index").to_numpy()
        x = decode_images(batch.column("image").to_pylist(), self.size, None, keys=keys)
        feats = self.embedder.embed(x)  # float32 [b, d]
        cols = {name: batch.column(name) for name in batch.column_names if name != "image" or self.keep_images}
        d = feats.shape[1]
        cols[self.column] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), d)
        return pa.table(cols)


def extract_features(
    shards: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    state_dict: dict | None = None,
    model_spec: dict | None = None,
    column: str = FEATURE_COLUMN,
    keep_images: bool = False,
    actors: int = 2,
    batch_size: int = 256,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    task_cpus: float = 1.0,
    overwrite: bool = False,
    sort_by_label: bool = False,
) -> Path:
    """Embed every row of ``shards`` into a new shard set at ``out`` (atomically).

    Rows keep the source order (``preserve_order``), so a class stays contiguous and the
    refinement actors can read class ranges with Parquet row-group statistics.
    ``task_cpus``: the CPUs each read / write task asks for (a run inside a training loop
    asks for less, so that it fits beside the training workers).
    ``gpus_per_actor``: the GPU share of each actor (``unibct_ray.resources``); > 0 embeds on
    the GPU under fp16 autocast, 0 on the CPU in float32 with one torch thread per whole CPU
    of ``cpus_per_actor``. ``batch_size``:
    images per forward pass (``extract_batch`` of the config).
    ``state_dict`` + ``model_spec`` (no ``checkpoint``): a live run's weights; they are written
    to a file beside ``out`` for the pass and the actors load them from there, so an actor that
    Ray restarts mid-pass rebuilds itself from a path, not from freed object-store arguments.
    ``sort_by_label``: rewrite each output file sorted by (label, index), for sets that are read
    by class range (:func:`read_class_range`). Training shards are stored in a permutation,
    so without it every row group would span all classes and no read could skip one.
    """
    src = read_manifest(shards)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.execution_options.preserve_order
    previous_block = ctx.target_max_block_size
    ctx.execution_options.preserve_order = True
    # Ray Data hands an actor a block whole, and a Parquet file is read as one block: a set of
    # fewer files than actors would leave actors idle (measured: all 640 rows of a one-file set
    # went to one of two actors). Blocks of at most 1/4 of an actor's share of the bytes give
    # every actor several; large sets keep Ray's default block size.
    total = sum(s.bytes for s in src.shards)
    share = total // max(1, 4 * actors)
    block = max(64 << 10, share)
    if previous_block is not None:
        block = min(previous_block, block)
        ctx.target_max_block_size = int(block)
    # A pool larger than the blocks it will get would start actors that only wait.
    actors = max(1, min(actors, max(len(src.shards), -(-total // int(block)))))
    weights_path = ""
    if not checkpoint:
        # Live weights go to a file beside the output (storage every node sees) and the actors
        # get its path: constructor arguments that large would travel through the object store,
        # and an actor restarted after its arguments were freed could not be rebuilt.
        import torch

        from unibct_ray.atomic import atomic_write

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        weights_path = str(Path(out).parent / f".{Path(out).name}.weights-{os.getpid()}.pt")
        buf = io.BytesIO()
        torch.save({"state_dict": state_dict, "model_spec": model_spec}, buf)
        atomic_write(weights_path, buf.getvalue())
    try:
        ds = read_shard_set(shards, task_cpus=task_cpus).map_batches(
            Embedder,
            batch_format="pyarrow",
            batch_size=batch_size,
            fn_constructor_kwargs={"checkpoint": str(checkpoint or ""), "column": column,
                                   "keep_images": keep_images, "weights_path": weights_path,
                                   "use_gpu": gpus_per_actor > 0,
                                   "threads": max(1, int(cpus_per_actor))},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {}),
        )
        with StagedDir(out, overwrite=overwrite) as stage:
            ds.write_parquet(str(stage.path), min_rows_per_file=50_000, ray_remote_args={"num_cpus": task_cpus})
            files = sorted(stage.path.glob("*.parquet"))
            shards_info = []
            rows = 0
            for i, f in enumerate(files):
                new = f.with_name(f"part-{i:05d}.parquet")
                f.rename(new)
                if sort_by_label:
                    _sort_file(new)
                n = pq.ParquetFile(new).metadata.num_rows
                rows += n
                shards_info.append(ShardInfo(new.name, n, new.stat().st_size))
            schema = pq.read_schema(stage.path / shards_info[0].file) if shards_info else None
            write_manifest(stage.path, shards_info, rows=rows, classes=src.classes,
                           columns=list(schema.names) if schema else [],
                           features={"column": column, "source": str(src.path),
                                     "checkpoint": str(checkpoint) if checkpoint else None})
            if rows != src.rows:
                raise RuntimeError(f"feature extraction wrote {rows} rows for {src.rows} inputs")
            stage.commit()
    finally:
        ctx.execution_options.preserve_order = previous
        ctx.target_max_block_size = previous_block
        if weights_path:
            Path(weights_path).unlink(missing_ok=True)
    return Path(out)


def _sort_file(path: Path) -> None:
    """Rewrite one Parquet file sorted by (label, index), in row groups of ``ROW_GROUP_ROWS``."""
    from unibct_ray.data.shards import ROW_GROUP_ROWS

    table = pq.read_table(path).sort_by([("label", "ascending"), ("index", "ascending")])
    tmp = path.with_name(path.name + ".sorting")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    tmp.replace(path)


def read_class_range(path: str | os.PathLike, column: str, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with ``c0 <= label < c1`` of a feature shard set -> (index [k], label [k], feats [k, d]),
    sorted by index. Uses row-group statistics, so only the needed pieces are read."""
    import pyarrow.dataset as pads

    from unibct_ray.distributed.data import feature_matrix

    m = read_manifest(path, check_files=True)
    dataset = pads.dataset([str(f) for f in m.files], format="parquet")
    flt = (pads.field("label") >= c0) & (pads.field("label") < c1)
    table = dataset.to_table(columns=["index", "label", column], filter=flt)
    index = table.column("index").to_numpy()
    order = np.argsort(index, kind="stable")
    return index[order], table.column("label").to_numpy()[order], feature_matrix(table, column)[order]
