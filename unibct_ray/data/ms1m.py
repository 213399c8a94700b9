"""The insightface MS1M layout on top of RecordIO (``train.rec`` / ``train.idx``).

* Record 0: an IRHeader with ``flag = 2`` and labels ``[a, b]``.
* Image records: keys ``1 .. a-1``; each IRHeader's class is ``label[0]`` (array label) or
  ``label`` (scalar); the JPEG follows the header.
* Identity records: keys ``a .. b-1``, each with labels ``[first_key, end_key)`` of that
  identity's images. Files written by common split tools put the class count in ``b``
  instead, so only ``a`` is trusted: images are keys ``1 .. a-1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from unibct_ray.data.recordio import RecordIOReader, RecordIOWriter, pack_irheader, unpack_irheader
from unibct_ray.errors import DataFormatError

__all__ = ["MS1MHeader", "read_ms1m_header", "image_keys", "read_image", "read_images", "read_images_arrow", "write_ms1m", "write_ms1m_trailer", "image_kind"]


@dataclass(frozen=True)
class MS1MHeader:
    """Record 0: images are keys ``1 .. image_end-1``; ``second`` is ``b`` (not trusted)."""

    image_end: int
    second: int

    @property
    def num_images(self) -> int:
        return self.image_end - 1


def read_ms1m_header(reader: RecordIOReader) -> MS1MHeader:
    """Parse record 0 of an MS1M-layout ``.rec``."""
    if 0 not in reader:
        raise DataFormatError(f"{reader.idx_path}: key 0 (the MS1M header record) is not in the index")
    header, _ = unpack_irheader(reader.read(0), where=f"{reader.rec_path} key 0")
    if header.flag < 1 or not isinstance(header.label, np.ndarray):
        raise DataFormatError(
            f"{reader.rec_path} key 0: not an MS1M header record (flag {header.flag}, expected a "
            "label array [images_end, identities_end])"
        )
    a = float(header.label[0])
    b = float(header.label[1]) if header.label.size > 1 else a
    if not a.is_integer() or a < 1:
        raise DataFormatError(f"{reader.rec_path} key 0: header label {a} is not a valid image-key bound")
    return MS1MHeader(int(a), int(b))


def image_keys(reader: RecordIOReader, header: MS1MHeader | None = None) -> np.ndarray:
    """Keys of the image records, ``1 .. a-1`` (int64 [n]); every one must be in the index."""
    header = header or read_ms1m_header(reader)
    keys = np.arange(1, header.image_end, dtype=np.int64)
    present = np.isin(keys, reader.keys)
    if not present.all():
        missing = keys[~present]
        raise DataFormatError(
            f"{reader.idx_path}: the header says image keys 1..{header.image_end - 1}, but "
            f"{missing.size} are missing from the index (first: {int(missing[0])})"
        )
    return keys


_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


def image_kind(data: bytes) -> str | None:
    """'jpeg' / 'png' from the file signature, or None for anything else."""
    if data[:3] == _JPEG:
        return "jpeg"
    if data[:8] == _PNG:
        return "png"
    return None


def read_image(reader: RecordIOReader, key: int) -> tuple[int, bytes]:
    """(class label, encoded image bytes exactly as stored) of image record ``key``.

    Checks that the class is a non-negative integer and the bytes carry a JPEG/PNG signature.
    """
    header, img = unpack_irheader(reader.read(key), where=f"{reader.rec_path} key {key}")
    label = header.class_label
    if not np.isfinite(label) or not float(label).is_integer() or label < 0:
        raise DataFormatError(f"{reader.rec_path} key {key}: class label {label} is not a non-negative integer")
    if image_kind(img) is None:
        raise DataFormatError(
            f"{reader.rec_path} key {key}: image bytes are not a JPEG or PNG (starts with {img[:4].hex()})"
        )
    return int(label), img


def read_images(reader: RecordIOReader, keys: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """Many image records at once -> (labels int64 [k], encoded images [k]).

    Same checks and results as ``read_image`` per key, but the framing, IRHeaders and
    signatures are parsed with vectorised numpy over the mapped file; only the image bytes
    are sliced one by one. Records split into several chunks fall back to ``read_image``.
    """
    keys = np.asarray(keys, np.int64)
    start, end, whole = reader.chunk_spans(keys)
    labels = np.zeros(len(keys), np.int64)
    images: list[bytes] = [b""] * len(keys)
    split = np.flatnonzero(~whole)
    for i in split.tolist():
        labels[i], images[i] = read_image(reader, int(keys[i]))
    w = np.flatnonzero(whole)
    if not len(w):
        return labels, images
    labels[w], img_start = _validated_headers(reader, keys[w], start[w], end[w])
    e = end[w]
    buf = reader._buf()
    for i, a, b in zip(w.tolist(), img_start.tolist(), e.tolist()):
        images[i] = buf[a:b]
    return labels, images


def _validated_headers(reader: RecordIOReader, keys: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised IRHeader checks of single-chunk records with payload spans ``[s, e)``
    -> (class labels int64 [k], image start offsets [k]); any bad record is re-read with
    ``read_image`` to raise its detailed message."""
    from unibct_ray.data.recordio import _gather_u32

    def fail(i: int) -> None:
        read_image(reader, int(keys[i]))
        raise DataFormatError(f"{reader.rec_path} key {int(keys[i])}: invalid image record")

    short = np.flatnonzero(e - s < 28)  # 24-byte IRHeader + a 4-byte image signature at least
    if short.size:
        fail(int(short[0]))
    buf = reader._buf()
    flag = _gather_u32(buf, s, 1)[:, 0].astype(np.int64)
    img_start = s + 24 + 4 * flag
    bad = np.flatnonzero((flag > (1 << 20)) | (img_start + 4 > e))
    if bad.size:
        fail(int(bad[0]))
    # class = label[0] when flag > 0 (first array label), else the scalar label
    lab = _gather_u32(buf, np.where(flag > 0, s + 24, s + 4), 1)[:, 0].view("<f4").astype(np.float64)
    sig = _gather_u32(buf, img_start, 1)[:, 0]
    ok_sig = ((sig & 0xFFFFFF) == 0xFFD8FF) | (sig == 0x474E5089)
    bad = np.flatnonzero(~np.isfinite(lab) | (lab < 0) | (lab != np.floor(lab)) | ~ok_sig)
    if bad.size:
        fail(int(bad[0]))
    return lab.astype(np.int64), img_start


def read_images_arrow(reader: RecordIOReader, keys: np.ndarray):
    """Like ``read_images`` but the images come as one ``pyarrow.BinaryArray``.

    The image bytes are copied once, straight from the mapped file into the Arrow buffer
    (no intermediate ``bytes`` objects): this is the converter's hot path.
    """
    import pyarrow as pa

    keys = np.asarray(keys, np.int64)
    start, end, whole = reader.chunk_spans(keys)
    if not whole.all() or len(keys) == 0:
        labels, images = read_images(reader, keys)
        return labels, pa.array(images, pa.binary())
    labels, img_start = _validated_headers(reader, keys, start, end)
    buf = reader._buf()
    lengths = end - img_start
    offsets = np.zeros(len(keys) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    mv = memoryview(buf)
    try:
        data = b"".join([mv[a:b] for a, b in zip(img_start.tolist(), end.tolist())])
    finally:
        mv.release()
    kind = pa.binary() if offsets[-1] < 2**31 - 1 else pa.large_binary()
    off_dtype = np.int32 if kind == pa.binary() else np.int64
    arr = pa.Array.from_buffers(kind, len(keys), [None, pa.py_buffer(offsets.astype(off_dtype)), pa.py_buffer(data)])
    return labels, arr


def write_ms1m(
    rec_path: str | os.PathLike,
    images: Iterable[tuple[int, bytes]],
    idx_path: str | os.PathLike | None = None,
    *,
    array_labels: bool = True,
) -> MS1MHeader:
    """Write images (``(label, jpeg)`` in class order) in the MS1M layout, atomically.

    Image keys are ``1..n`` in iteration order, then one identity record per class, then
    record 0. Labels must come grouped by class (each class one contiguous run).
    """
    rec_path = Path(rec_path)
    runs: list[tuple[int, int, int]] = []  # (label, first_key, end_key)
    with RecordIOWriter(rec_path, idx_path) as w:
        key = 0
        for key, (label, img) in enumerate(images, start=1):
            lab = [float(label), 0.0] if array_labels else float(label)
            w.write(key, pack_irheader(lab, img, id=key))
            if runs and runs[-1][0] == label:
                runs[-1] = (label, runs[-1][1], key + 1)
            else:
                if any(r[0] == label for r in runs):
                    raise ValueError(f"{rec_path}: class {label} is not contiguous in the input order")
                runs.append((label, key, key + 1))
        return write_ms1m_trailer(w, [(first, end) for _, first, end in runs], num_images=key)


def write_ms1m_trailer(w: RecordIOWriter, identity_ranges: list[tuple[int, int]], num_images: int) -> MS1MHeader:
    """Write the identity records and the header record 0 after ``num_images`` image records.

    Record 0 goes last physically because its values need the counts; that is valid RecordIO
    (readers, MXNet's included, seek through ``.idx``).
    """
    a = num_images + 1
    for j, (first, end) in enumerate(identity_ranges):
        w.write(a + j, pack_irheader([float(first), float(end)], b"", id=a + j))
    b = a + len(identity_ranges)
    w.write(0, pack_irheader([float(a), float(b)], b""))
    return MS1MHeader(a, b)
