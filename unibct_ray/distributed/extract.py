"""Feature extraction over a shard set on a Ray actor pool (the model is loaded once per actor).

Output is a shard set keyed by record ``index``: ``index``, ``label`` (+ ``source_label`` when
present), and the feature column (fixed-size list of float32). With ``keep_images`` the
``image`` column is carried along, giving a training set whose rows hold their old-model
features (what the l2 loss consumes).

Each actor reads its pieces (row ranges of the source Parquet files) itself, embeds them and
writes one output file per piece, named by the piece's position, so the output keeps the
source order. No Ray Data pipeline runs beside the actors: on 2 CPUs its read and write
tasks and streaming executor took a fifth of the CPU time from the model (see
``unibct-ray bench extract``), and nothing but the actors has to be scheduled, which is what
a GPU cluster's plan has to fit beside the training workers.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from unibct_ray.data.images import decode_images
from unibct_ray.data.shards import ShardInfo, StagedDir, read_manifest, write_manifest
from unibct_ray.distributed.data import FEATURE_COLUMN

__all__ = ["Embedder", "PieceEmbedder", "Piece", "plan_pieces", "extract_features"]


class Embedder:
    """One batch of shard rows -> the same rows with the feature column (decode, no flip; backbone).

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
        return self.finish(*self.prepare(batch))

    def prepare(self, batch: pa.Table | None) -> tuple[pa.Table, np.ndarray] | None:
        """Decode a batch's images (None passes through: the end of a piece)."""
        if batch is None:
            return None
        keys = batch.column("index").to_numpy()
        return batch, decode_images(batch.column("image").to_pylist(), self.size, None, keys=keys)

    def finish(self, batch: pa.Table, x: np.ndarray) -> pa.Table:
        """Embed decoded images ``x`` and return ``batch`` with the feature column."""
        feats = self.embedder.embed(x)  # float32 [b, d]
        cols = {name: batch.column(name) for name in batch.column_names if name != "image" or self.keep_images}
        d = feats.shape[1]
        cols[self.column] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), d)
        return pa.table(cols)


#: Rows of one piece at most: one output file (the shard converter's default file size).
PIECE_ROWS = 50_000


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one source Parquet file, embedded into output file ``n``."""

    n: int
    file: str
    start: int
    stop: int


def plan_pieces(files: list[Path], rows: list[int], actors: int) -> list[Piece]:
    """Cut each file into pieces of at most :data:`PIECE_ROWS` rows, and small enough that every
    actor gets about four (a set of fewer files than actors still feeds every actor)."""
    total = sum(rows)
    size = max(1, min(PIECE_ROWS, -(-total // max(1, 4 * actors))))
    pieces: list[Piece] = []
    for f, n in zip(files, rows):
        k = -(-n // size)  # equal pieces of this file
        bounds = [round(i * n / k) for i in range(k + 1)] if k else []
        pieces += [Piece(len(pieces) + j, str(f), a, b) for j, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return pieces


class PieceEmbedder:
    """An extraction actor: :class:`Embedder` over whole pieces, each written to its own file.

    On a GPU the next batch is read and decoded on a helper thread while the model embeds the
    current one (PIL and torch release the GIL), so the GPU does not wait on JPEG decoding.
    """

    def __init__(self, batch_size: int, prefetch: bool | None = None, **embedder_kwargs):
        self.embed = Embedder(**embedder_kwargs)
        self.batch_size = batch_size
        self.prefetch = bool(embedder_kwargs.get("use_gpu")) if prefetch is None else prefetch

    def _batches(self, piece: Piece):
        """The piece's rows in batches of at most ``batch_size``, all of (nearly) one size: the
        piece is cut into ``ceil(rows / batch_size)`` equal batches (80 rows at 64 -> 40 + 40,
        not 64 + 16). Every forward pass then asks for the same activation sizes, so the blocks
        the last one freed serve the next (``unibct_ray.heap``) and a GPU tunes its kernels for
        one shape; alternating 64 and 16 made the heap grow again piece after piece."""
        pf = pq.ParquetFile(piece.file)
        md = pf.metadata
        rows = piece.stop - piece.start
        k = max(1, -(-rows // self.batch_size))
        cuts = [piece.start + round(i * rows / k) for i in range(k + 1)]
        starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        held: pa.Table | None = None  # the row groups read so far that later batches still need
        held_start = held_stop = piece.start
        g = int(np.searchsorted(starts, piece.start, side="right")) - 1  # the group holding the first row
        for lo, hi in zip(cuts, cuts[1:]):
            while held_stop < hi:  # read row groups until the batch is covered
                g0, g1 = int(starts[g]), int(starts[g + 1])
                t = pf.read_row_group(g)
                g += 1
                a, b = max(held_stop, g0), min(piece.stop, g1)
                t = t.slice(a - g0, b - a)
                held = t if held is None else pa.concat_tables([held, t])
                held_stop = b
            yield held.slice(lo - held_start, hi - lo)
            if hi < held_stop:  # keep only what the next batches need
                held, held_start = held.slice(hi - held_start), hi
            else:
                held, held_start = None, hi

    def _prepared(self, piece: Piece):
        """Decoded batches of ``piece``; on a GPU the next one is read and decoded on a helper
        thread while the model embeds the current one. On the CPU the model already keeps the
        actor's CPUs busy, so there is no idle CPU for a read-ahead to use (bench extract gave
        0.80x with it and 0.75-0.95x without, within this machine's noise)."""
        batches = self._batches(piece)
        if not self.prefetch:
            yield from (self.embed.prepare(b) for b in batches)
            return
        from concurrent.futures import ThreadPoolExecutor

        def load() -> tuple[pa.Table, np.ndarray] | None:  # read + decode; one call in flight at a time
            return self.embed.prepare(next(batches, None))

        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(load)
            while (ready := nxt.result()) is not None:
                nxt = pool.submit(load)
                yield ready

    def run(self, piece: Piece, out_dir: str) -> tuple[int, str, int]:
        """Embed ``piece`` into ``out_dir/part-{n:05d}.parquet`` (temp name, then rename);
        returns (n, file name, rows). A retried piece overwrites its file whole."""
        from unibct_ray.data.shards import ROW_GROUP_ROWS

        name = f"part-{piece.n:05d}.parquet"
        final = Path(out_dir) / name
        tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
        writer: pq.ParquetWriter | None = None
        pending: list[pa.Table] = []  # embedded batches not yet written: under one row group
        rows = 0
        try:
            for ready in self._prepared(piece):
                pending.append(self.embed.finish(*ready))
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    writer = _write(writer, tmp, pending)
                    rows, pending = rows + sum(t.num_rows for t in pending), []
            if pending:
                writer = _write(writer, tmp, pending)
                rows += sum(t.num_rows for t in pending)
            if writer is not None:
                writer.close()
                os.replace(tmp, final)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
        if rows != piece.stop - piece.start:
            raise RuntimeError(f"{piece.file}: rows {piece.start}-{piece.stop} gave {rows} features")
        return piece.n, name, rows


def _write(writer: pq.ParquetWriter | None, path: Path, tables: list[pa.Table]) -> pq.ParquetWriter:
    from unibct_ray.data.shards import ROW_GROUP_ROWS

    table = pa.concat_tables(tables)
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    return writer


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
    overwrite: bool = False,
    sort_by_label: bool = False,
    progress: bool | None = None,
) -> Path:
    """Embed every row of ``shards`` into a new shard set at ``out`` (atomically).

    Rows keep the source order (output file ``n`` holds piece ``n``), so a class stays
    contiguous and the refinement actors can read class ranges with Parquet row-group
    statistics. Only the ``actors`` actors are scheduled (``cpus_per_actor`` CPUs and
    ``gpus_per_actor`` of a GPU each); an actor that dies is restarted and its piece run again.
    ``gpus_per_actor``: the GPU share of each actor (``unibct_ray.resources``); > 0 embeds on
    the GPU under fp16 autocast, 0 on the CPU in float32 with one torch thread per whole CPU
    of ``cpus_per_actor``. ``batch_size``: images per forward pass (``extract_batch`` of the
    config). ``progress``: a bar over the rows on stderr (None: when stderr is a terminal).
    ``state_dict`` + ``model_spec`` (no ``checkpoint``): a live run's weights; they are written
    to a file beside ``out`` for the pass and the actors load them from there, so an actor that
    Ray restarts mid-pass rebuilds itself from a path, not from freed object-store arguments.
    ``sort_by_label``: rewrite each output file sorted by (label, index), for sets that are read
    by class range (:func:`read_class_range`). Training shards are stored in a permutation,
    so without it every row group would span all classes and no read could skip one.
    """
    from ray.util import ActorPool

    src = read_manifest(shards, check_files=True)
    files = list(src.files)
    rows_per_file = [pq.ParquetFile(f).metadata.num_rows for f in files]
    pieces = plan_pieces(files, rows_per_file, actors)
    # A pool larger than its pieces would start actors that only wait.
    actors = max(1, min(actors, len(pieces)))
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
    pool_actors = []
    try:
        with StagedDir(out, overwrite=overwrite) as stage:
            if pieces:
                cls = ray.remote(PieceEmbedder).options(
                    num_cpus=cpus_per_actor, max_restarts=3, max_task_retries=3,
                    **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {}))
                kwargs = {"checkpoint": str(checkpoint or ""), "column": column, "keep_images": keep_images,
                          "weights_path": weights_path, "use_gpu": gpus_per_actor > 0,
                          "threads": max(1, int(cpus_per_actor))}
                pool_actors = [cls.remote(batch_size, **kwargs) for _ in range(actors)]
                done = _run_pieces(ActorPool(pool_actors), pieces, str(stage.path), progress)
            else:
                done = []
            for stray in stage.path.glob(".*.tmp"):  # left by an actor killed mid-piece (run again)
                stray.unlink()
            shards_info = []
            rows = 0
            for n, name, k in sorted(done):
                path = stage.path / name
                if sort_by_label:
                    _sort_file(path)
                rows += k
                shards_info.append(ShardInfo(name, k, path.stat().st_size))
            schema = pq.read_schema(stage.path / shards_info[0].file) if shards_info else None
            write_manifest(stage.path, shards_info, rows=rows, classes=src.classes,
                           columns=list(schema.names) if schema else [],
                           features={"column": column, "source": str(src.path),
                                     "checkpoint": str(checkpoint) if checkpoint else None})
            if rows != src.rows:
                raise RuntimeError(f"feature extraction wrote {rows} rows for {src.rows} inputs")
            stage.commit()
    finally:
        for a in pool_actors:
            ray.kill(a)
        if weights_path:
            Path(weights_path).unlink(missing_ok=True)
    return Path(out)


def _run_pieces(pool, pieces: list[Piece], out_dir: str, progress: bool | None) -> list[tuple[int, str, int]]:
    from tqdm.auto import tqdm

    from unibct_ray.distributed.runtime import unwrap_task_error

    done = []
    with tqdm(total=sum(p.stop - p.start for p in pieces), unit="img", desc="extract",
              disable=None if progress is None else not progress, smoothing=0) as bar:
        try:
            for res in pool.map_unordered(lambda a, p: a.run.remote(p, out_dir), pieces):
                done.append(res)
                bar.update(res[2])
        except ray.exceptions.RayTaskError as err:  # e.g. an image that does not decode, by its key
            raise unwrap_task_error(err) from None
    return done


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
