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

__all__ = ["MS1MHeader", "read_ms1m_header", "image_keys", "read_image", "write_ms1m", "write_ms1m_trailer", "image_kind"]


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
