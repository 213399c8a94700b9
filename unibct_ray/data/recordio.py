"""MXNet RecordIO (``.rec`` + ``.idx``) read and write, without mxnet.

Byte layout (little-endian), as written by MXNet's ``MXIndexedRecordIO``:

* A logical record is one or more *chunks*: ``uint32 magic = 0xCED7230A``,
  ``uint32 lrec = cflag << 29 | length``, ``length`` payload bytes, zero padding to a multiple
  of 4. ``cflag`` 0 = whole record, 1 = first, 2 = middle, 3 = last chunk.
* The writer splits a payload wherever the magic occurs at a 4-byte-aligned offset *of the
  payload* and drops those 4 bytes; the reader joins the chunks re-inserting the magic.
  (JPEG bytes do contain the magic now and then, so this is not a corner case at 5M images.)
* ``.idx`` is text, one ``key<TAB>offset`` line per record, offset = start of its first chunk.
  Records may sit in any order in the file, so random access always goes through the index.
* A payload usually starts with an ``IRHeader``: ``uint32 flag, float32 label, uint64 id,
  uint64 id2`` (24 bytes); when ``flag > 0``, ``flag`` float32 labels follow and ``label`` is
  unused.

Reading maps the file (``mmap``): a key costs one index lookup and touches only that record's
pages, so a 20 GB ``train.rec`` is never read whole.
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from unibct_ray.errors import DataFormatError

__all__ = [
    "MAGIC",
    "IRHeader",
    "pack_irheader",
    "unpack_irheader",
    "encode_record",
    "read_idx",
    "RecordIOReader",
    "RecordIOWriter",
    "default_idx_path",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IRHEADER = struct.Struct("<IfQQ")
_CHUNK_HEAD = struct.Struct("<II")


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte image-record header. ``label`` is a float or a float32 array [flag]."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int

    @property
    def class_label(self) -> float:
        """Class of an image record: ``label[0]`` when the label is an array, else ``label``."""
        if isinstance(self.label, np.ndarray):
            return float(self.label[0])
        return float(self.label)


def pack_irheader(label: float | np.ndarray | list[float], payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + (array labels) + ``payload``; an array/list label sets ``flag = len(label)``."""
    if isinstance(label, (list, tuple, np.ndarray)):
        arr = np.asarray(label, dtype="<f4").reshape(-1)
        head = _IRHEADER.pack(arr.size, 0.0, id, id2)
        return head + arr.tobytes() + payload
    return _IRHEADER.pack(0, float(label), id, id2) + payload


def unpack_irheader(record: bytes | memoryview, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into its ``IRHeader`` and the remaining bytes (the image)."""
    if len(record) < _IRHEADER.size:
        raise DataFormatError(f"{where}: payload of {len(record)} bytes is shorter than a 24-byte IRHeader")
    flag, label, rid, rid2 = _IRHEADER.unpack_from(record, 0)
    start = _IRHEADER.size
    if flag > 0:
        end = start + 4 * flag
        if flag > (1 << 20) or end > len(record):
            raise DataFormatError(f"{where}: IRHeader claims {flag} labels but the payload holds {len(record)} bytes")
        labels = np.frombuffer(bytes(record[start:end]), dtype="<f4").astype(np.float32)
        return IRHeader(flag, labels, rid, rid2), bytes(record[end:])
    return IRHeader(0, float(label), rid, rid2), bytes(record[start:])


def encode_record(payload: bytes) -> bytes:
    """Frame one logical record as RecordIO chunks (splitting at aligned magic words)."""
    view = memoryview(payload)
    n = len(payload)
    # Aligned positions of the magic inside the payload; a scan with find() keeps this fast for
    # the common case of none.
    cuts: list[int] = []
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= n:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = payload.find(_MAGIC_BYTES, pos + 4)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    out = bytearray()
    start = 0
    pieces = []
    for cut in cuts:
        pieces.append(view[start:cut])
        start = cut + 4
    pieces.append(view[start:])
    for i, piece in enumerate(pieces):
        if len(pieces) == 1:
            cflag = 0
        elif i == 0:
            cflag = 1
        elif i == len(pieces) - 1:
            cflag = 3
        else:
            cflag = 2
        length = len(piece)
        if length > _LEN_MASK:
            raise ValueError(f"a RecordIO chunk holds at most {_LEN_MASK} bytes, got {length}")
        out += _CHUNK_HEAD.pack(MAGIC, (cflag << 29) | length)
        out += piece
        out += b"\x00" * (-length % 4)
    return bytes(out)


def default_idx_path(rec_path: str | os.PathLike) -> Path:
    """``train.rec`` -> ``train.idx`` (the MXNet convention)."""
    p = Path(rec_path)
    return p.with_suffix(".idx")


def read_idx(idx_path: str | os.PathLike, rec_size: int | None = None,
             rec_path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse an ``.idx`` file: ``key<TAB>offset`` per line -> (keys int64 [n], offsets int64 [n]).

    Validates the shape of every line, unique keys, and (when ``rec_size`` is given) that no
    offset points past the end of the ``.rec`` file; that error names both files (``rec_path``)
    so that a mismatched pair is recognised as one.
    """
    path = Path(idx_path)
    if not path.is_file():
        raise DataFormatError(f"{path}: index file not found")
    raw = path.read_bytes()
    lines = raw.splitlines()
    # Trailing blank lines are common; blank lines elsewhere are not valid.
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.zeros(0, np.int64)
    # Fast path for the MXNet layout (exactly one tab per line, no spaces): numpy parses the
    # numbers; a token count of 2 per line then proves every line is "key<TAB>offset".
    if raw.count(b"\t") == len(lines) and b" " not in raw:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                flat = np.fromstring(raw.decode("ascii", "replace"), dtype=np.int64, sep=" ")
            except ValueError:
                pass
    if flat.size == 2 * len(lines):
        arr = flat.reshape(-1, 2)
    else:  # any other spacing, or a bad line: check line by line and name the culprit
        rows = []
        for lineno, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise DataFormatError(f"{path}:{lineno}: expected 'key<TAB>offset', got {line[:60]!r}")
            try:
                rows.append((int(parts[0]), int(parts[1])))
            except ValueError:
                raise DataFormatError(
                    f"{path}:{lineno}: key and offset must be integers, got {line[:60]!r}"
                ) from None
        arr = np.array(rows, np.int64).reshape(-1, 2)
    keys, offsets = arr[:, 0].copy(), arr[:, 1].copy()
    if (offsets < 0).any() or (keys < 0).any():
        bad = int(np.flatnonzero((offsets < 0) | (keys < 0))[0])
        raise DataFormatError(f"{path}:{bad + 1}: negative key or offset")
    if np.unique(keys).size != keys.size:
        uniq, counts = np.unique(keys, return_counts=True)
        raise DataFormatError(f"{path}: key {int(uniq[counts > 1][0])} appears more than once")
    if rec_size is not None:
        past = np.flatnonzero(offsets + _CHUNK_HEAD.size > rec_size)
        if past.size:
            i = int(past[0])
            raise DataFormatError(
                f"{path}:{i + 1}: key {int(keys[i])} has offset {int(offsets[i])} past the end "
                f"of {rec_path if rec_path is not None else 'the .rec file'} ({rec_size} bytes)"
            )
    return keys, offsets


class RecordIOReader:
    """Random access to an indexed ``.rec`` file by key (``mmap``; picklable for Ray tasks).

    >>> with RecordIOReader("train.rec") as r:          # doctest: +SKIP
    ...     header, jpeg = r.read_with_header(1)
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else default_idx_path(self.rec_path)
        if not self.rec_path.is_file():
            raise DataFormatError(f"{self.rec_path}: RecordIO file not found")
        self.size = self.rec_path.stat().st_size
        self.keys, self.offsets = read_idx(self.idx_path, rec_size=self.size, rec_path=self.rec_path)
        self._index()
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None

    def _index(self) -> None:
        # Sorted arrays + searchsorted instead of a dict: MS1Mv3 has 5.2M keys, a dict of them
        # costs ~0.5 GB per process and seconds to build in every Ray task.
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys = self.keys[order]
        self._sorted_offsets = self.offsets[order]

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [k], offsets int64 [k]) for ``keys``."""
        keys = np.asarray(keys, np.int64)
        pos = np.searchsorted(self._sorted_keys, keys)
        pos_c = np.minimum(pos, max(len(self._sorted_keys) - 1, 0))
        found = (pos < len(self._sorted_keys)) & (self._sorted_keys[pos_c] == keys) if len(self._sorted_keys) else np.zeros(len(keys), bool)
        return found, self._sorted_offsets[pos_c] if len(self._sorted_keys) else np.zeros(len(keys), np.int64)

    # -- pickling: Ray ships readers to tasks; reopen the file there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_map"] = None
        return state

    def subset(self, keys: np.ndarray) -> "RecordIOReader":
        """A reader over the same file that knows only ``keys`` (cheap to ship to a Ray task)."""
        keys = np.asarray(keys, np.int64)
        found, offsets = self._lookup(keys)
        if not found.all():
            raise DataFormatError(f"{self.idx_path}: key {int(keys[~found][0])} is not in the index")
        sub = object.__new__(RecordIOReader)
        sub.rec_path, sub.idx_path, sub.size = self.rec_path, self.idx_path, self.size
        sub.keys, sub.offsets = keys, offsets
        sub._index()
        sub._file, sub._map = None, None
        return sub

    def _buf(self) -> mmap.mmap | bytes:
        if self._map is None:
            if self.size == 0:
                return b""
            self._file = open(self.rec_path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return bool(self._lookup(np.array([key]))[0][0])

    def offset(self, key: int) -> int:
        found, off = self._lookup(np.array([key]))
        if not found[0]:
            raise DataFormatError(f"{self.idx_path}: key {key} is not in the index")
        return int(off[0])

    def chunk_spans(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised framing of many records -> (payload start, payload end, whole) int64/bool [k].

        ``whole`` is False for records split into several chunks (the magic inside their
        payload): read those with ``read``. Raises on a bad magic or a truncated chunk.
        """
        keys = np.asarray(keys, np.int64)
        found, off = self._lookup(keys)
        if not found.all():
            raise DataFormatError(f"{self.idx_path}: key {int(keys[~found][0])} is not in the index")
        head = _gather_u32(self._buf(), off, 2)
        bad = np.flatnonzero(head[:, 0] != MAGIC)
        if bad.size:
            i = int(bad[0])
            self.read_at(int(off[i]), int(keys[i]))  # raises the detailed message
        cflag, length = head[:, 1] >> 29, (head[:, 1] & _LEN_MASK).astype(np.int64)
        start = off + 8
        end = start + length
        past = np.flatnonzero(end > self.size)
        if past.size:
            i = int(past[0])
            self.read_at(int(off[i]), int(keys[i]))
        return start, end, cflag == 0

    def read_at(self, offset: int, key: int | None = None) -> tuple[bytes, int]:
        """Read the logical record starting at ``offset`` -> (payload, offset after it)."""
        return _read_record(self._buf(), offset, self.size, self.rec_path, key)

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (IRHeader included), chunks joined."""
        return self.read_at(self.offset(key), key)[0]

    def read_with_header(self, key: int) -> tuple[IRHeader, bytes]:
        """(IRHeader, bytes after it) of record ``key``."""
        return unpack_irheader(self.read(key), where=f"{self.rec_path} key {key}")

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every logical record in *file* order, ignoring the index: (offset, payload)."""
        buf = self._buf()
        pos = 0
        while pos < self.size:
            payload, nxt = _read_record(buf, pos, self.size, self.rec_path, None)
            yield pos, payload
            pos = nxt


def _gather_u32(buf: mmap.mmap | bytes, offsets: np.ndarray, count: int) -> np.ndarray:
    """``count`` little-endian uint32 at each byte offset -> uint32 [k, count] (bounds-checked)."""
    size = len(buf)
    offsets = np.asarray(offsets, np.int64)
    if len(offsets) and int(offsets.max()) + 4 * count > size:
        raise DataFormatError(f"read of {4 * count} bytes at offset {int(offsets.max())} runs past the end ({size} bytes)")
    u8 = np.frombuffer(buf, np.uint8)
    try:
        idx = offsets[:, None] + np.arange(4 * count)
        return np.ascontiguousarray(u8[idx]).view("<u4").reshape(len(offsets), count)
    finally:
        del u8  # release the export so the mmap can be closed


def _read_record(buf: mmap.mmap | bytes, offset: int, size: int, path: Path, key: int | None) -> tuple[bytes, int]:
    what = f"{path}: record at offset {offset}" + (f" (key {key})" if key is not None else "")
    parts: list[bytes] = []
    pos = offset
    expect_more = False
    while True:
        if pos + 8 > size:
            raise DataFormatError(f"{what}: file truncated (chunk header past the end at {pos}, file is {size} bytes)")
        magic, lrec = _CHUNK_HEAD.unpack_from(buf, pos)
        if magic != MAGIC:
            raise DataFormatError(f"{what}: no RecordIO magic at byte {pos} (found 0x{magic:08X}); not a .rec file or a wrong offset")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        start = pos + 8
        end = start + length
        if end > size:
            raise DataFormatError(f"{what}: file truncated (chunk of {length} bytes at {pos} ends past {size})")
        if expect_more:
            if cflag not in (2, 3):
                raise DataFormatError(f"{what}: chunk flag {cflag} at byte {pos} inside a split record")
            parts.append(_MAGIC_BYTES)
        elif cflag not in (0, 1):
            raise DataFormatError(f"{what}: record starts with continuation chunk flag {cflag}")
        parts.append(buf[start:end])
        pos = end + (-length % 4)
        if cflag in (0, 3):
            break
        expect_more = True
    return (parts[0] if len(parts) == 1 else b"".join(parts)), pos


class RecordIOWriter:
    """Write an indexed ``.rec``/``.idx`` pair atomically.

    Records go to temporary files beside the targets; ``close()`` (or leaving the ``with``
    block without an exception) renames them into place, so a crash never leaves a file that
    looks complete. ``abort()`` (or an exception in the block) deletes the temporaries.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else default_idx_path(self.rec_path)
        tag = uuid.uuid4().hex[:8]
        self._tmp_rec = self.rec_path.with_name(f".{self.rec_path.name}.{tag}.tmp")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}.{tag}.tmp")
        self._f: BinaryIO | None = open(self._tmp_rec, "wb")
        self._idx_lines: list[str] = []
        self._keys: set[int] = set()
        self.position = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append record ``key``; returns its offset."""
        if self._f is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        self._keys.add(key)
        data = encode_record(payload)
        offset = self.position
        self._f.write(data)
        self.position += len(data)
        self._idx_lines.append(f"{key}\t{offset}\n")
        return offset

    def append_file(self, rec_path: Path, idx_path: Path) -> None:
        """Append every record of another indexed ``.rec`` (e.g. a part written by a worker)."""
        if self._f is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        keys, offsets = read_idx(idx_path, rec_size=rec_path.stat().st_size, rec_path=rec_path)
        clash = self._keys.intersection(keys.tolist())
        if clash:
            raise ValueError(f"{rec_path}: key {min(clash)} already written to {self.rec_path}")
        base = self.position
        with open(rec_path, "rb") as src:
            while block := src.read(1 << 22):
                self._f.write(block)
                self.position += len(block)
        self._keys.update(keys.tolist())
        self._idx_lines.extend(f"{k}\t{o + base}\n" for k, o in zip(keys.tolist(), offsets.tolist()))

    def close(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        with open(self._tmp_idx, "w") as f:
            f.writelines(self._idx_lines)
        os.replace(self._tmp_rec, self.rec_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for p in (self._tmp_rec, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
