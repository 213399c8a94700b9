"""IJB-C metadata writers: the insightface layout, written atomically.

The synthetic benchmark (``data synth``) writes its IJB-C folder through these, so every test
and the demo read it back through the same readers (:mod:`unibct_ray.data.ijbc`) a user's
real folder goes through. Files are written to a temporary name, fsynced and renamed.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from unibct_ray.atomic import atomic_write
from unibct_ray.data.ijbc import _CSV_HEADER

__all__ = ["write_tid_mid", "write_5pts_score", "write_pair_label", "write_1n_csv"]


def _atomic_write(path: Path, chunks: Iterable[str | bytes]) -> None:
    """Readers never see a half-written file; a crash leaves any old file intact."""
    atomic_write(path, chunks)


# Rows formatted per call: large enough for C-speed formatting, small enough that no
# chunk's temporaries (strings, or ~10 int64 arrays per value) grow past ~100 MB.
_WRITE_ROWS = 1 << 16
_WRITE_INT_ROWS = 1 << 20
_POW10 = 10 ** np.arange(19, dtype=np.int64)  # 1 .. 1e18, all representable in int64


def _format_rows(row_fmt: str, columns: Sequence[Sequence[object]], n: int) -> Iterable[str]:
    """Yield text for ``n`` rows, ``row_fmt % (col0[i], col1[i], ...)`` per row."""
    for lo in range(0, n, _WRITE_ROWS):
        hi = min(lo + _WRITE_ROWS, n)
        flat = tuple(itertools.chain.from_iterable(zip(*(c[lo:hi] for c in columns))))
        yield (row_fmt * (hi - lo)) % flat


def _format_int_rows(table: np.ndarray) -> Iterable[bytes]:
    """Yield ``table`` (int64 [n, k]) as text, fields separated by ' ', rows by '\\n'.

    Vectorised decimal formatting: ``%``-formatting 15.7M pair rows takes ~11 s, this ~1 s.
    """
    n, k = table.shape
    for lo in range(0, n, _WRITE_INT_ROWS):
        v = table[lo : lo + _WRITE_INT_ROWS].ravel()
        neg = v < 0
        mag = np.abs(v)  # int64 min is rejected by the caller, so this cannot overflow
        ndig = np.maximum(np.searchsorted(_POW10, mag, side="right"), 1)
        width = ndig + neg + 1  # digits, sign, then a separator or newline
        ends = np.cumsum(width)
        buf = np.full(int(ends[-1]), ord(" "), dtype=np.uint8)
        buf[ends[k - 1 :: k] - 1] = ord("\n")
        buf[(ends - width)[neg]] = ord("-")
        if mag.size and int(mag.max()) < 2**31:
            mag = mag.astype(np.int32)  # 32-bit division is about twice as fast
        last = ends - 2  # position of the units digit
        for d in range(int(ndig.max())):
            sel = np.flatnonzero(ndig > d)
            buf[last[sel] - d] = (mag[sel] // mag.dtype.type(_POW10[d])) % 10 + ord("0")
        yield buf.tobytes()


def _check_names(names: Sequence[str], what: str) -> list[str]:
    out = [str(n) for n in names]
    for i, n in enumerate(out):
        if not n or any(ch.isspace() for ch in n):
            raise ValueError(f"{what} {i} is {n!r}: names must be non-empty without whitespace")
    return out


def _int_column(x: np.ndarray, n: int, what: str) -> list[int]:
    a = np.asarray(x)
    if a.shape != (n,) or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{what} must be an integer array of shape [{n}], got {a.dtype} {a.shape}")
    return a.astype(np.int64).tolist()


def write_tid_mid(
    path: str | os.PathLike[str], names: Sequence[str], templates: np.ndarray, medias: np.ndarray
) -> None:
    """Write ``ijbc_face_tid_mid.txt``: names [n], templates int [n], medias int [n]."""
    nm = _check_names(names, "image name")
    n = len(nm)
    t = _int_column(templates, n, "templates")
    m = _int_column(medias, n, "medias")
    _atomic_write(Path(path), _format_rows("%s %d %d\n", (nm, t, m), n))


def write_5pts_score(
    path: str | os.PathLike[str], names: Sequence[str], landmarks: np.ndarray, scores: np.ndarray
) -> None:
    """Write ``ijbc_name_5pts_score.txt``: names [n], landmarks [n, 5, 2], scores [n].

    Floats use ``%.9g``, which round-trips float32 exactly.
    """
    nm = _check_names(names, "image name")
    n = len(nm)
    lm = np.asarray(landmarks, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if lm.shape != (n, 5, 2):
        raise ValueError(f"landmarks must have shape [{n}, 5, 2], got {lm.shape}")
    if sc.shape != (n,):
        raise ValueError(f"scores must have shape [{n}], got {sc.shape}")
    if not (np.isfinite(lm).all() and np.isfinite(sc).all()):
        raise ValueError("landmarks and scores must be finite")
    cols: list[Sequence[object]] = [nm]
    cols += [c.tolist() for c in lm.reshape(n, 10).T]
    cols.append(sc.tolist())
    _atomic_write(Path(path), _format_rows("%s" + " %.9g" * 11 + "\n", cols, n))


def write_pair_label(path: str | os.PathLike[str], pairs: np.ndarray, labels: np.ndarray) -> None:
    """Write ``ijbc_template_pair_label.txt``: pairs int [n, 2], labels in {0, 1} [n]."""
    pr = np.asarray(pairs)
    if pr.ndim != 2 or pr.shape[1] != 2:
        raise ValueError(f"pairs must have shape [n, 2], got {pr.shape}")
    n = pr.shape[0]
    lab = np.asarray(labels)
    if lab.shape != (n,) or not (np.issubdtype(lab.dtype, np.integer) or n == 0):
        raise ValueError(
            f"labels must be an integer array of shape [{n}], got {lab.dtype} {lab.shape}"
        )
    if n and not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must be 0 (impostor) or 1 (genuine)")
    if n and not np.issubdtype(pr.dtype, np.integer):
        raise ValueError(f"pairs must be an integer array, got {pr.dtype}")
    table = np.empty((n, 3), dtype=np.int64)
    table[:, :2] = pr
    table[:, 2] = lab
    if n and table.min() == np.iinfo(np.int64).min:
        raise ValueError("template ids must be > int64 min")
    _atomic_write(Path(path), _format_int_rows(table))


def write_1n_csv(
    path: str | os.PathLike[str],
    templates: np.ndarray,
    subjects: np.ndarray,
    filenames: Sequence[str],
    sighting_ids: np.ndarray | None = None,
) -> None:
    """Write a 1:N CSV with header ``TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID``.

    One row per image: templates int [r], subjects int [r], filenames [r]; sighting_ids
    int [r] defaults to 1..r. A template must keep one subject across its rows.
    """
    fn = [str(f) for f in filenames]
    r = len(fn)
    t = _int_column(templates, r, "templates")
    s = _int_column(subjects, r, "subjects")
    if sighting_ids is None:
        sid = list(range(1, r + 1))
    else:
        sid = _int_column(sighting_ids, r, "sighting_ids")
    subject_of: dict[int, int] = {}
    for i, (ti, si) in enumerate(zip(t, s)):
        if subject_of.setdefault(ti, si) != si:
            raise ValueError(f"row {i}: template {ti} has subjects {subject_of[ti]} and {si}")

    def rows() -> Iterable[str]:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_CSV_HEADER)
        for lo in range(0, r, _WRITE_ROWS):
            hi = min(lo + _WRITE_ROWS, r)
            w.writerows(zip(t[lo:hi], s[lo:hi], fn[lo:hi], sid[lo:hi]))
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()

    _atomic_write(Path(path), rows())
