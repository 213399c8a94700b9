"""Parquet shard sets: the training data format every Ray Data pipeline reads.

A shard set is a directory::

    DIR/manifest.json            rows, classes, shard list, source, columns
    DIR/part-00000.parquet       columns image (binary: JPEG bytes as stored), label (int64,
    DIR/part-00001.parquet       contiguous 0..C-1), index (int64: the .rec key), and for
    ...                          split sets source_label (int64: the class in the source set)

Sets are written into a hidden temporary sibling directory and renamed into place when
complete, so an interrupted run never leaves a directory that looks like a finished data set
(a directory without ``manifest.json`` is never read as one).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unibct_ray.atomic import atomic_write
from unibct_ray.errors import DataFormatError, UserError

__all__ = [
    "MANIFEST",
    "SHARD_SCHEMA",
    "ShardInfo",
    "Manifest",
    "StagedDir",
    "shard_name",
    "write_shard",
    "ShardWriter",
    "write_manifest",
    "read_manifest",
    "read_columns",
    "atomic_write_text",
]

MANIFEST = "manifest.json"
FORMAT = "unibct-ray/parquet-shards"
SHARD_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
REQUIRED_COLUMNS = ("label", "index")
# Small row groups let Ray Data stream a shard in pieces instead of materialising it whole.
ROW_GROUP_ROWS = 2048


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Parsed ``manifest.json``; ``path`` is the shard-set directory."""

    path: Path
    rows: int
    classes: int
    shards: tuple[ShardInfo, ...]
    columns: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.path / s.file for s in self.shards if s.rows > 0]


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`unibct_ray.atomic.atomic_write`)."""
    atomic_write(path, text)


def _parquet_options(columns: list[str]) -> dict[str, Any]:
    # Images are JPEG already: compressing them again costs CPU for ~0 bytes saved, and min/max
    # statistics of 4 KB blobs are useless, so both apply to the integer columns only.
    return {
        "compression": {c: ("none" if c == "image" else "zstd") for c in columns},
        "use_dictionary": [c for c in columns if c in ("label", "source_label")],  # index is unique per row
        "write_statistics": [c for c in columns if c != "image"],
    }


class ShardWriter:
    """Stream record batches into one Parquet shard; the file appears (renamed) on ``close``.

    Memory stays at one row group however large the shard: the converter's hot path.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._writer = pq.ParquetWriter(self._tmp, schema, **_parquet_options(schema.names))
        except OSError as e:
            raise self._named(e) from e
        self.rows = 0

    def _named(self, e: OSError) -> OSError:
        """A failed write (a full disk, a lost mount) as an error that names the shard: pyarrow's
        own names no file, and the CLI prints an ``OSError`` as one line."""
        what = e.strerror or str(e)
        return OSError(e.errno, f"{what} (writing this Parquet shard; it was not kept)", str(self.path))

    def write(self, table: pa.Table) -> None:
        try:
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        except OSError as e:
            raise self._named(e) from e
        self.rows += table.num_rows

    def close(self) -> ShardInfo:
        try:
            self._writer.close()
        except OSError as e:
            raise self._named(e) from e
        os.replace(self._tmp, self.path)
        return ShardInfo(self.path.name, self.rows, self.path.stat().st_size)

    def abort(self) -> None:
        try:
            self._writer.close()
        except OSError:
            pass  # a full disk fails the close too: the first error is the one to report
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(path: Path, table: pa.Table) -> ShardInfo:
    """Write one Parquet shard atomically (temporary name, then rename)."""
    with ShardWriter(path, table.schema) as w:
        w.write(table)
        return w.close()


#: A ``.partial`` folder of another host is taken for dead after this long without a change.
STALE_PARTIAL_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_partials(final: Path, *, log=print) -> list[Path]:
    """Remove ``.NAME.<host>-<pid>.<id>.partial`` siblings of ``final`` left by killed runs."""
    host = socket.gethostname().replace(".", "_")
    removed = []
    for p in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        owner = p.name[len(final.name) + 2:].rsplit(".", 2)[0]
        o_host, _, o_pid = owner.rpartition("-")
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:
            continue
        dead = (o_host == host and o_pid.isdigit() and not _pid_alive(int(o_pid))) or age > STALE_PARTIAL_S
        if dead:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log(f"removed {p}: the unfinished output of a run that was killed")
    return removed


class StagedDir:
    """A directory built under a temporary sibling name and renamed into place on ``commit``.

    >>> with StagedDir(out) as stage:                       # doctest: +SKIP
    ...     write_shard(stage.path / shard_name(0), table)
    ...     stage.commit()
    Leaving the block without ``commit()`` (an error, Ctrl-C) removes the temporary directory.
    An existing ``out`` is refused unless ``overwrite=True``.

    A killed process cannot clean up: its ``.partial`` folder (up to the data set's size) is
    left behind. The folder's name records the host and process that own it, so the next
    run of the same output removes the ones whose process is gone (same host) or that are
    older than :data:`STALE_PARTIAL_S` (another host), and says so; a live writer's folder
    is never touched.
    """

    def __init__(self, final: str | os.PathLike, *, overwrite: bool = False, log=print):
        self.final = Path(final)
        self.overwrite = overwrite
        if self.final.exists() and not overwrite:
            raise UserError(f"{self.final}: already exists (pass --overwrite to replace it)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.final, log=log)
        owner = f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"
        self.path = self.final.with_name(f".{self.final.name}.{owner}.{uuid.uuid4().hex[:8]}.partial")
        self.path.mkdir()
        self.committed = False

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            if not self.overwrite:
                raise UserError(f"{self.final}: appeared while writing (pass --overwrite to replace it)")
            old = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def write_manifest(dir_path: Path, shards: list[ShardInfo], *, rows: int, classes: int,
                   columns: list[str], **extra: Any) -> None:
    doc = {
        "format": FORMAT,
        "version": 1,
        "rows": int(rows),
        "classes": int(classes),
        "columns": list(columns),
        "shards": [{"file": s.file, "rows": int(s.rows), "bytes": int(s.bytes)} for s in shards],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    atomic_write_text(dir_path / MANIFEST, json.dumps(doc, indent=2) + "\n")


def read_manifest(dir_path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Load and validate a shard set's ``manifest.json`` (and that its shard files exist)."""
    d = Path(dir_path)
    if not d.is_dir():
        raise DataFormatError(f"{d}: shard directory not found")
    mpath = d / MANIFEST
    if not mpath.is_file():
        n = len(list(d.glob("*.parquet")))
        hint = f" ({n} .parquet files but no manifest: an unfinished or foreign set)" if n else " (empty directory?)"
        raise DataFormatError(f"{mpath}: not found{hint}")
    try:
        doc = json.loads(mpath.read_text())
        shards = tuple(ShardInfo(str(s["file"]), int(s["rows"]), int(s.get("bytes", 0))) for s in doc["shards"])
        rows, classes, columns = int(doc["rows"]), int(doc["classes"]), tuple(doc["columns"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{mpath}: not a valid shard manifest ({type(e).__name__}: {e})") from None
    if doc.get("format") != FORMAT:
        raise DataFormatError(f"{mpath}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataFormatError(f"{mpath}: shard columns lack {missing} (have {list(columns)})")
    if sum(s.rows for s in shards) != rows:
        raise DataFormatError(f"{mpath}: shard rows add up to {sum(s.rows for s in shards)}, manifest says {rows}")
    if rows == 0:
        raise DataFormatError(f"{mpath}: the shard set is empty (0 rows)")
    if check_files:
        for s in shards:
            p = d / s.file
            if s.rows and not p.is_file():
                raise DataFormatError(f"{p}: shard listed in {MANIFEST} is missing")
    extra = {k: v for k, v in doc.items() if k not in {"rows", "classes", "shards", "columns"}}
    return Manifest(d, rows, classes, shards, columns, extra)


def read_columns(manifest: Manifest, columns: list[str]) -> dict[str, np.ndarray]:
    """Read whole (small) columns of every shard in manifest order, e.g. label and index.

    Checks the shard files against the manifest: columns present, row counts equal.
    """
    out: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for s in manifest.shards:
        if s.rows == 0:
            continue
        path = manifest.path / s.file
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(f"{path}: not a readable Parquet file ({e})") from None
        absent = [c for c in columns if c not in schema.names]
        if absent:
            raise DataFormatError(f"{path}: missing column(s) {absent} (has {schema.names})")
        for c in columns:
            t = schema.field(c).type
            if c in _INTEGER_COLUMNS and not pa.types.is_integer(t):
                raise DataFormatError(f"{path}: column {c!r} holds {t}, expected integers")
        table = pq.read_table(path, columns=columns)
        if table.num_rows != s.rows:
            raise DataFormatError(f"{path}: {table.num_rows} rows, {MANIFEST} says {s.rows}")
        for c in columns:
            col = table.column(c).to_numpy()
            if c in ("label", "source_label") and col.size:
                _check_label_range(col, path, c, manifest)
            out[c].append(col)
    return {c: (np.concatenate(v) if v else np.zeros(0, np.int64)) for c, v in out.items()}


_INTEGER_COLUMNS = ("label", "index", "source_label")
#: No class id above this: a label of 2**40 would make per-class arrays terabytes long.
MAX_LABEL = (1 << 31) - 1


def _check_label_range(col: np.ndarray, path: Path, name: str, manifest: Manifest) -> None:
    """Labels in ``[0, bound]``: the manifest's ``label_max`` when it has one (``data convert``
    writes it), else a bound from the row count that still allows sparse class ids. A label of
    2**40 or -5 is refused here, before per-class arrays are allocated. Names the file and row."""
    if name == "label" and "label_max" in manifest.extra:
        bound, why = int(manifest.extra["label_max"]), f"{MANIFEST}'s label_max"
    else:  # class ids may be sparse (a split keeps the source's), but not wildly so
        bound, why = min(MAX_LABEL, max(1 << 20, 16 * int(manifest.rows))), f"{manifest.rows} rows"
    bad = np.flatnonzero((col < 0) | (col > bound))
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(f"{path}: row {i} has {name} {int(col[i])}, outside 0..{bound} ({why})")
