"""IJB-C metadata in the insightface layout: readers and validation (writers: ``ijbc_writers``).

Layout under a root directory (either the directory containing ``IJBC/`` or ``IJBC``
itself)::

    IJBC/meta/ijbc_face_tid_mid.txt          img_name template_id media_id
    IJBC/meta/ijbc_name_5pts_score.txt       img_name x1 y1 ... x5 y5 score (same rows)
    IJBC/meta/ijbc_template_pair_label.txt   t1 t2 label            (1 genuine, 0 impostor)
    IJBC/meta/ijbc_1N_gallery_G1.csv         TEMPLATE_ID,SUBJECT_ID,FILENAME,... (header)
    IJBC/meta/ijbc_1N_gallery_G2.csv
    IJBC/meta/ijbc_1N_probe_mixed.csv
    IJBC/loose_crop/<img_name>

The text files are whitespace separated without a header. The pair file of the real
benchmark has 15.7M lines (~300 MB). Each file is first read by pyarrow's columnar CSV
reader (one space between fields, explicit column types, multithreaded), which takes the
regular files real folders hold at close to disk speed. Anything it refuses (tabs, runs of
spaces, blank lines, a bad field) goes to the strict parser below: a chunked, vectorised
numpy parser (``np.fromstring`` plus a byte-level field count per line), which either reads
the file the same way or locates the error with its file and line.

``read_ijbc_meta(..., cache_dir=D)`` also keeps the parsed, validated meta in ``D`` as an
uncompressed ``.npz`` (plain arrays, no pickles), keyed by each meta file's size, mtime and a
hash of its first MB, so evaluating the same folder again does not parse 15.7M lines again.
A hit maps the file and reads its arrays in place (read-only, each checked against its zip
CRC-32): 0.1 s for the real benchmark's 175 MB instead of ~0.45 s copying and widening them.
A cache file that does not load or does not fit is rebuilt.

Every format problem raises :class:`~unibct_ray.errors.DataFormatError` whose message names
the file, the 1-based line number where there is one, and what is wrong. Blank lines are
only tolerated at the end of a text file, so row ``i`` is always line ``i + 1``.

Why one file of ~1,000 lines: the columnar fast reader and the strict parser that names the line
of an error read the same six files and must agree field for field (tests compare them); the
parsed-meta cache keys on both.
"""

from __future__ import annotations

import csv
import hashlib
import io
import mmap
import os
import re
import struct
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unibct_ray.errors import DataFormatError, UserError

__all__ = [
    "TID_MID_FILE",
    "PAIR_LABEL_FILE",
    "NAME_5PTS_FILE",
    "GALLERY1_FILE",
    "GALLERY2_FILE",
    "PROBE_FILE",
    "TemplateSubjects",
    "IJBCMeta",
    "resolve_ijbc_dir",
    "meta_dir",
    "image_dir",
    "read_ijbc_meta",
    "read_ijbc_meta_cached",
    "read_tid_mid",
    "read_5pts_score",
    "read_pair_label",
    "read_1n_csv",
    "check_image_names",
]

TID_MID_FILE = "ijbc_face_tid_mid.txt"
PAIR_LABEL_FILE = "ijbc_template_pair_label.txt"
NAME_5PTS_FILE = "ijbc_name_5pts_score.txt"
GALLERY1_FILE = "ijbc_1N_gallery_G1.csv"
GALLERY2_FILE = "ijbc_1N_gallery_G2.csv"
PROBE_FILE = "ijbc_1N_probe_mixed.csv"

#: Column headers the 1:N CSVs must contain (extra columns are ignored).
_CSV_REQUIRED = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME")
#: Header the writer emits; SIGHTING_ID is kept so files look like the real ones.
_CSV_HEADER = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "SIGHTING_ID")

# Bytes per parse chunk: big enough that numpy call overhead is negligible, small enough
# that the per-chunk temporaries (bool masks per byte, int64 per field) stay ~200 MB.
_CHUNK_BYTES = 1 << 25


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True, eq=False)
class TemplateSubjects:
    """Unique templates of a 1:N list and their subject ids.

    Attributes:
        templates: int64 [g], sorted ascending, unique.
        subjects: int64 [g], ``subjects[i]`` is the subject of ``templates[i]``.
    """

    templates: np.ndarray
    subjects: np.ndarray

    def __len__(self) -> int:
        return int(self.templates.shape[0])

    @classmethod
    def empty(cls) -> TemplateSubjects:
        """A list with no templates (used when 1:N meta is not read)."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass(frozen=True, eq=False)
class IJBCMeta:
    """All IJB-C meta needed for 1:1 verification and 1:N identification.

    Attributes:
        root: the ``IJBC`` directory.
        image_names: [n_img] file names relative to ``root / "loose_crop"``.
        templates: int64 [n_img] template id of each image.
        medias: int64 [n_img] media id of each image.
        landmarks: float32 [n_img, 5, 2] five points (x, y) in the loose crop.
        scores: float32 [n_img] detector score.
        pairs: int [n_pairs, 2] template id pairs (int64 when parsed; int32 where the ids
            fit, read-only, when read from the cache).
        pair_labels: int8 [n_pairs], 1 genuine, 0 impostor.
        gallery1, gallery2, probes: unique templates and subjects of the 1:N lists; empty
            when read with ``with_1n=False`` (see :attr:`has_1n`).
    """

    root: Path
    image_names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    pairs: np.ndarray
    pair_labels: np.ndarray
    gallery1: TemplateSubjects
    gallery2: TemplateSubjects
    probes: TemplateSubjects

    @property
    def n_images(self) -> int:
        return len(self.image_names)

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def image_dir(self) -> Path:
        """Directory holding the images (``root / "loose_crop"``)."""
        return self.root / "loose_crop"

    @property
    def has_1n(self) -> bool:
        """Whether the 1:N gallery/probe lists were read."""
        return len(self.gallery1) > 0 or len(self.gallery2) > 0 or len(self.probes) > 0


# --------------------------------------------------------------------------- paths


def resolve_ijbc_dir(root: str | os.PathLike[str]) -> Path:
    """Return the ``IJBC`` directory for ``root`` (its parent or the directory itself).

    Raises:
        UserError: neither ``root/IJBC/meta`` nor ``root/meta`` is a directory.
    """
    r = Path(root)
    if (r / "IJBC" / "meta").is_dir():
        return r / "IJBC"
    if (r / "meta").is_dir():
        return r
    raise UserError(
        f"{r} is not an IJB-C root: expected the directory {r / 'IJBC' / 'meta'} "
        f"(root containing IJBC/) or {r / 'meta'} (the IJBC directory itself)"
    )


def meta_dir(root: str | os.PathLike[str]) -> Path:
    """``<IJBC>/meta`` for either root form."""
    return resolve_ijbc_dir(root) / "meta"


def image_dir(root: str | os.PathLike[str]) -> Path:
    """``<IJBC>/loose_crop`` for either root form."""
    return resolve_ijbc_dir(root) / "loose_crop"


# --------------------------------------------------------------------------- low-level parsing


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataFormatError(f"{path}: IJB-C meta file not found")
    return path.read_bytes()


def _fmt_token(tok: bytes | str) -> str:
    s = tok.decode("utf-8", "replace") if isinstance(tok, bytes) else tok
    return repr(s if len(s) <= 40 else s[:37] + "...")


def _token_starts(buf: np.ndarray) -> np.ndarray:
    """Positions (int64) of the first byte of every field in ``buf`` (uint8 [n_bytes]).

    Bytes <= 0x20 (space, tab, CR, LF, ...) separate fields.
    """
    is_tok = buf > 32
    starts = np.empty_like(is_tok)
    starts[0] = is_tok[0]
    np.greater(is_tok[1:], is_tok[:-1], out=starts[1:])  # field byte after a separator
    return np.flatnonzero(starts)


def _line_ends(buf: np.ndarray) -> np.ndarray:
    """Newline position ending each line of ``buf``; ``len(buf)`` for an unterminated last line."""
    ends = np.flatnonzero(buf == 10)
    if buf[-1] != 10:
        ends = np.append(ends, buf.size)
    return ends


def _regular_rows(starts: np.ndarray, line_ends: np.ndarray, n_fields: int) -> int | None:
    """Number of rows if the first rows hold exactly ``n_fields`` fields and the rest are blank.

    O(n) without per-line counting: with sorted field starts, line ``i`` holds fields
    ``k*i .. k*i+k-1`` exactly when the last of them precedes newline ``i`` and the next
    field follows it. Returns None when that fails (the caller then counts per line).
    """
    n_tok = starts.size
    if n_tok % n_fields:
        return None
    rows = n_tok // n_fields
    if rows > line_ends.size:
        return None
    if rows == 0:
        return 0
    if not np.all(starts[n_fields - 1 :: n_fields] < line_ends[:rows]):
        return None
    if not np.all(starts[n_fields::n_fields] > line_ends[: rows - 1]):
        return None
    return rows


def _tokens_per_line(starts: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """Number of fields on each line, int64 [n_lines] (slow path, for locating errors)."""
    return np.bincount(np.searchsorted(line_ends, starts), minlength=line_ends.size)


def _diagnose_numeric(
    lines: Iterable[bytes], first_line: int, lead_fields: int, kind: type, path: Path, layout: str
) -> None:
    """Slow path: raise for the first line whose fields do not parse as ``kind``."""
    conv = int if kind is int else float
    for offset, line in enumerate(lines):
        for j, tok in enumerate(line.split()):
            try:
                conv(tok)
                ok = b"_" not in tok  # Python accepts "1_000", numpy does not
            except ValueError:
                ok = False
            if not ok:
                what = "an integer" if kind is int else "a number"
                raise DataFormatError(
                    f"{path}, line {first_line + offset}: field {j + 1 + lead_fields} "
                    f"{_fmt_token(tok)} is not {what} (expected '{layout}')"
                )


def _raise_layout_error(
    counts: np.ndarray,
    n_fields: int,
    lead_fields: int,
    lines_before: int,
    pending_blank: int | None,
    path: Path,
    layout: str,
) -> None:
    """Raise for the first line of a chunk (fields per line ``counts``) that breaks the layout."""
    filled = np.flatnonzero(counts)
    if not filled.size:
        return
    if pending_blank is not None:
        raise DataFormatError(f"{path}, line {pending_blank}: empty line")
    bad = np.flatnonzero(counts[: filled[-1] + 1] != n_fields)
    if bad.size:
        i = int(bad[0])
        what = "empty line" if counts[i] == 0 else (
            f"expected {n_fields + lead_fields} fields ('{layout}'), "
            f"found {int(counts[i]) + lead_fields}"
        )
        raise DataFormatError(f"{path}, line {lines_before + i + 1}: {what}")


def _parse_numeric_table(
    data: bytes,
    n_fields: int,
    dtype: type[np.generic],
    path: Path,
    layout: str,
    lead_fields: int = 0,
) -> np.ndarray:
    """Parse whitespace-separated numbers, exactly ``n_fields`` per line.

    Args:
        data: the file contents.
        n_fields: fields per line.
        dtype: ``np.int64`` or ``np.float64``.
        path, layout: for error messages (``layout`` describes one line, e.g. "t1 t2 label").
        lead_fields: fields the caller already removed from the front of every line (the
            image name); only shifts field numbers and counts in error messages.

    Returns:
        [n_rows, n_fields] array of ``dtype``; row ``i`` is line ``i + 1``.
    """
    kind: type = int if np.issubdtype(dtype, np.integer) else float
    total = len(data)
    # Upper bound on rows, so the result is filled in place instead of concatenated.
    out = np.empty((data.count(b"\n") + 1, n_fields), dtype=dtype)
    row = 0
    lines_before = 0  # lines fully contained in earlier chunks
    pending_blank: int | None = None  # 1-based number of a blank line seen so far
    pos = 0
    while pos < total:
        end = min(pos + _CHUNK_BYTES, total)
        if end < total:  # cut after a newline so no line straddles two chunks
            nl = data.rfind(b"\n", pos, end)
            if nl < 0:
                nl = data.find(b"\n", end)
                end = total if nl < 0 else nl + 1
            else:
                end = nl + 1
        buf = np.frombuffer(data, dtype=np.uint8, count=end - pos, offset=pos)
        starts = _token_starts(buf)
        line_ends = _line_ends(buf)
        n_rows = _regular_rows(starts, line_ends, n_fields)
        if n_rows is None or (n_rows and pending_blank is not None):
            _raise_layout_error(
                _tokens_per_line(starts, line_ends), n_fields, lead_fields, lines_before,
                pending_blank, path, layout,
            )
            # Not reached (an irregular chunk always has a bad line); kept as a safe net.
            raise DataFormatError(f"{path}: irregular field layout (expected '{layout}')")
        if n_rows < line_ends.size and pending_blank is None:
            pending_blank = lines_before + n_rows + 1
        if n_rows:
            chunk = data[pos:end]
            vals: np.ndarray | None
            try:
                with warnings.catch_warnings():
                    # numpy signals "stopped at an unparsable token" with a warning.
                    warnings.simplefilter("error")
                    vals = np.fromstring(chunk, dtype=dtype, sep=" ")  # noqa: NPY201
            except (ValueError, DeprecationWarning, RuntimeWarning):
                vals = None
            if vals is None or vals.size != n_rows * n_fields:
                _diagnose_numeric(
                    chunk.split(b"\n"), lines_before + 1, lead_fields, kind, path, layout
                )
                raise DataFormatError(
                    f"{path}, lines {lines_before + 1}-{lines_before + n_rows}: "
                    f"could not parse numbers (expected '{layout}')"
                )
            out[row : row + n_rows] = vals.reshape(n_rows, n_fields)
            row += n_rows
        lines_before += line_ends.size
        pos = end
    if row == 0:
        raise DataFormatError(f"{path}: file has no rows (expected lines '{layout}')")
    return out[:row]


# --------------------------------------------------------------------------- fast path


def _arrow_read(
    path: Path,
    types: dict[str, object],
    *,
    delimiter: str = " ",
    skip_rows: int = 0,
    include: list[str] | None = None,
    autogenerate: bool = False,
) -> object | None:
    """Read a delimited file with pyarrow's CSV reader -> ``pyarrow.Table``, or None.

    None (never an exception) whenever the reader refuses the file or a value is missing:
    the caller then runs the strict parser, which gives the same result or names the error.
    Quotes, escapes and null markers are off, and blank lines are refused, so a value is
    exactly the bytes between two delimiters and row ``i`` is the ``i``-th line after
    ``skip_rows``.
    """
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:  # pyarrow is a dependency, but the strict parser needs nothing
        return None
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=None if autogenerate else list(types),
                autogenerate_column_names=autogenerate,
                skip_rows=skip_rows,
                block_size=1 << 24,
                use_threads=True,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False, double_quote=False, escape_char=False,
                newlines_in_values=False, ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=include, null_values=[],
                strings_can_be_null=False, quoted_strings_can_be_null=False, check_utf8=True,
            ),
        )
    except (pa.ArrowException, OSError, ValueError):
        return None
    if table.num_rows == 0 or any(c.null_count for c in table.columns):
        return None
    return table


# Characters that separate fields for ``str.split()`` within the ASCII range, apart from the
# newline that joins names below: a name holding one would be split by the strict parser.
_ASCII_SPACE = re.compile(r"[\x00-\x09\x0b-\x20]")


def _fast_named_table(
    path: Path, n_numeric: int, dtype: type[np.generic]
) -> tuple[list[str], np.ndarray] | None:
    """Fast :func:`_parse_named_table` over ``path``; None when the strict parser must decide."""
    import pyarrow as pa

    cols = ["name"] + [f"v{j}" for j in range(n_numeric)]
    vtype = pa.int64() if np.issubdtype(dtype, np.integer) else pa.float64()
    table = _arrow_read(path, {c: (pa.string() if c == "name" else vtype) for c in cols})
    if table is None:
        return None
    names = table.column("name").to_pylist()
    joined = "\n".join(names)
    # The strict parser splits on any whitespace, Unicode included: such names go to it.
    if not joined.isascii() or _ASCII_SPACE.search(joined) or "" in names:
        return None
    vals = np.empty((table.num_rows, n_numeric), dtype=dtype)
    for j in range(n_numeric):
        vals[:, j] = table.column(f"v{j}").to_numpy()
    return names, vals


def _parse_named_table(
    data: bytes, n_numeric: int, dtype: type[np.generic], path: Path, layout: str
) -> tuple[list[str], np.ndarray]:
    """Parse lines ``name v1 ... vK``; returns (names [n], values [n, K] of ``dtype``).

    Only the name is split off in Python; the numbers go through the vectorised parser
    (per-token Python or string-array conversion is several times slower on 469k lines).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {line}: not valid UTF-8 text") from None
    names: list[str] = []
    rests: list[str] = []
    for i, line in enumerate(text.split("\n")):
        parts = line.split(None, 1)
        if not parts:
            rests.append("")  # blank: the numeric parser decides if it is allowed here
            continue
        if len(parts) == 1 and n_numeric:
            raise DataFormatError(
                f"{path}, line {i + 1}: expected {n_numeric + 1} fields ('{layout}'), found 1"
            )
        names.append(parts[0])
        rests.append(parts[1] if len(parts) > 1 else "")
    try:
        blob = "\n".join(rests).encode("ascii")
    except UnicodeEncodeError as e:
        line = "\n".join(rests)[: e.start].count("\n") + 1
        raise DataFormatError(
            f"{path}, line {line}: non-ASCII character in a numeric field"
        ) from None
    vals = _parse_numeric_table(blob, n_numeric, dtype, path, layout, lead_fields=1)
    return names[: vals.shape[0]], vals


# --------------------------------------------------------------------------- readers


def read_tid_mid(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``ijbc_face_tid_mid.txt`` (lines ``img_name template_id media_id``).

    Returns:
        (names [n], templates int64 [n], medias int64 [n]).
    """
    p = Path(path)
    fast = _fast_named_table(p, 2, np.int64) if p.is_file() else None
    names, vals = fast or _parse_named_table(
        _read_bytes(p), 2, np.int64, p, "img_name template_id media_id"
    )
    return names, np.ascontiguousarray(vals[:, 0]), np.ascontiguousarray(vals[:, 1])


def read_5pts_score(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``ijbc_name_5pts_score.txt`` (lines ``img_name x1 y1 ... x5 y5 score``).

    Returns:
        (names [n], landmarks float32 [n, 5, 2], scores float32 [n]).

    Raises:
        DataFormatError: also for NaN/inf landmarks or scores.
    """
    p = Path(path)
    layout = "img_name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score"
    fast = _fast_named_table(p, 11, np.float64) if p.is_file() else None
    names, vals64 = fast or _parse_named_table(_read_bytes(p), 11, np.float64, p, layout)
    vals = vals64.astype(np.float32)
    # Checked after the cast: a finite float64 beyond float32 range becomes inf too.
    finite = np.isfinite(vals)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        field = "score" if j == 10 else f"{'xy'[j % 2]}{j // 2 + 1}"
        raise DataFormatError(
            f"{p}, line {i + 1}: {field} is {vals64[i, j]} (landmarks and score must be "
            "finite float32 values)"
        )
    return names, vals[:, :10].reshape(-1, 5, 2).copy(), vals[:, 10].copy()


def read_pair_label(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``ijbc_template_pair_label.txt`` (lines ``t1 t2 label``).

    Returns:
        (pairs int64 [n, 2], labels int8 [n]) with labels in {0, 1}.
    """
    import pyarrow as pa

    p = Path(path)
    # A label outside int8 makes the fast reader refuse the file: the strict one names it.
    table = _arrow_read(p, {"t1": pa.int64(), "t2": pa.int64(), "label": pa.int8()}) if p.is_file() else None
    if table is not None:
        pairs = np.empty((table.num_rows, 2), dtype=np.int64)
        labels8 = np.empty(table.num_rows, dtype=np.int8)
        for j, c in enumerate(("t1", "t2", "label")):
            dst = labels8 if j == 2 else pairs[:, j]
            lo = 0
            for chunk in table.column(c).chunks:  # chunk by chunk: no concatenated copy
                dst[lo : lo + len(chunk)] = chunk.to_numpy(zero_copy_only=True)
                lo += len(chunk)
        del table
        bad = np.flatnonzero(labels8.view(np.uint8) > 1)  # negative labels wrap to >= 128
        if bad.size:
            i = int(bad[0])
            raise DataFormatError(
                f"{p}, line {i + 1}: label {int(labels8[i])} is not 0 (impostor) or 1 (genuine)"
            )
        return pairs, labels8
    data = _read_bytes(p)
    vals = _parse_numeric_table(data, 3, np.int64, p, "t1 t2 label")
    del data  # ~300 MB on the real file; free it before the copies below
    labels = vals[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{p}, line {i + 1}: label {int(labels[i])} is not 0 (impostor) or 1 (genuine)"
        )
    return np.ascontiguousarray(vals[:, :2]), labels.astype(np.int8)


@dataclass(frozen=True, eq=False)
class _CsvRows:
    """Per-row content of a 1:N CSV (int64 [r] each, plus 1-based line numbers)."""

    templates: np.ndarray
    subjects: np.ndarray
    lines: np.ndarray
    filenames: list[str]


def _fast_1n_rows(path: Path) -> _CsvRows | None:
    """:func:`_read_1n_rows` through pyarrow for a plain file; None when the strict reader must decide."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with open(path, "rb") as f:
        first = f.readline()
    try:
        head = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if '"' in head or not head.strip():
        return None  # quoted headers (or none): the csv module reads them
    header = next(csv.reader([head.rstrip("\r\n")]))
    names = [h.strip().upper() for h in header]
    if any(c not in names for c in _CSV_REQUIRED):
        return None
    it, isub, ifn = (names.index(c) for c in _CSV_REQUIRED)
    cols = {f"f{it}": pa.int64(), f"f{isub}": pa.int64(), f"f{ifn}": pa.string()}
    table = _arrow_read(path, cols, delimiter=",", skip_rows=1, include=list(cols), autogenerate=True)
    if table is None:
        return None
    n = table.num_rows
    # Every data row has exactly the header's fields: anything else goes to the strict reader.
    with open(path, "rb") as f:
        n_lines = sum(1 for line in f if line.strip()) - 1
    if n_lines != n:
        return None
    fn = table.column(f"f{ifn}")
    return _CsvRows(
        table.column(f"f{it}").to_numpy().astype(np.int64, copy=False),
        table.column(f"f{isub}").to_numpy().astype(np.int64, copy=False),
        np.arange(2, n + 2, dtype=np.int64),
        pc.utf8_trim_whitespace(fn).to_pylist(),
    )


def _read_1n_rows(path: Path) -> _CsvRows:
    fast = _fast_1n_rows(path) if path.is_file() else None
    if fast is not None:
        return fast
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not valid UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise DataFormatError(f"{path}, line 1: malformed CSV header: {e}") from None
    names = [h.strip().upper() for h in header]
    missing = [c for c in _CSV_REQUIRED if c not in names]
    if missing:
        raise DataFormatError(
            f"{path}, line 1: missing column(s) {', '.join(missing)} in header "
            f"{','.join(header)!r} (need {','.join(_CSV_REQUIRED)})"
        )
    it, isub, ifn = (names.index(c) for c in _CSV_REQUIRED)
    need = max(it, isub, ifn) + 1
    templates: list[int] = []
    subjects: list[int] = []
    lines: list[int] = []
    filenames: list[str] = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not f.strip() for f in row):
                continue  # csv tools often leave blank trailing rows
            if len(row) < need:
                raise DataFormatError(
                    f"{path}, line {line}: {len(row)} fields, expected at least {need} "
                    f"(the header has {len(header)} columns)"
                )
            for col, store in ((it, templates), (isub, subjects)):
                tok = row[col].strip()
                try:
                    store.append(int(tok))
                except ValueError:
                    raise DataFormatError(
                        f"{path}, line {line}: {names[col]} {_fmt_token(tok)} is not an integer"
                    ) from None
            filenames.append(row[ifn].strip())
            lines.append(line)
    except csv.Error as e:
        raise DataFormatError(f"{path}, line {reader.line_num}: malformed CSV: {e}") from None
    if not templates:
        raise DataFormatError(f"{path}: no data rows after the header")
    return _CsvRows(
        np.asarray(templates, dtype=np.int64),
        np.asarray(subjects, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        filenames,
    )


def _unique_templates(rows: _CsvRows, path: Path) -> tuple[TemplateSubjects, np.ndarray]:
    """Collapse rows to unique templates; also return the first line of each template."""
    order = np.argsort(rows.templates, kind="stable")
    t = rows.templates[order]
    s = rows.subjects[order]
    conflict = np.flatnonzero((t[1:] == t[:-1]) & (s[1:] != s[:-1]))
    if conflict.size:
        k = int(conflict[0])
        tid = int(t[k])
        first = rows.lines[order[k]]
        other = rows.lines[order[k + 1]]
        raise DataFormatError(
            f"{path}, line {int(other)}: template {tid} has SUBJECT_ID {int(s[k + 1])}, "
            f"but line {int(first)} gives it SUBJECT_ID {int(s[k])} (one subject per template)"
        )
    starts = np.concatenate(([True], t[1:] != t[:-1])) if t.size else np.zeros(0, bool)
    first_lines = rows.lines[order[starts]]
    return TemplateSubjects(t[starts].copy(), s[starts].copy()), first_lines


def read_1n_csv(path: str | os.PathLike[str]) -> TemplateSubjects:
    """Read a 1:N gallery/probe CSV (header with at least TEMPLATE_ID,SUBJECT_ID,FILENAME).

    Rows are images; a template spans several rows and must have a single subject.

    Returns:
        :class:`TemplateSubjects` of the unique templates, sorted by template id.
    """
    p = Path(path)
    return _unique_templates(_read_1n_rows(p), p)[0]


def _check_known_templates(
    ids: np.ndarray, known_sorted: np.ndarray, path: Path, line_of: np.ndarray | None, what: str
) -> None:
    """Raise if any of ``ids`` (any shape) is not in ``known_sorted`` (sorted unique)."""
    flat = ids.reshape(ids.shape[0], -1)
    lo, hi = int(known_sorted[0]), int(known_sorted[-1])
    if hi - lo < 1 << 26:
        # Dense id range (the real one is < 200k): a boolean lookup is ~10x faster than
        # binary search for the 31M pair ids. Slot hi-lo+1 is a False sentinel for ids
        # outside the range.
        member = np.zeros(hi - lo + 2, dtype=bool)
        member[known_sorted - lo] = True
        idx = flat - lo
        idx[(idx < 0) | (idx > hi - lo)] = hi - lo + 1
        unknown = ~member[idx]
    else:
        pos = np.searchsorted(known_sorted, flat)
        np.minimum(pos, known_sorted.size - 1, out=pos)
        unknown = known_sorted[pos] != flat
    if unknown.any():
        i, j = np.argwhere(unknown)[0]
        line = int(line_of[i]) if line_of is not None else int(i) + 1
        raise DataFormatError(
            f"{path}, line {line}: {what} {int(flat[i, j])} does not appear in {TID_MID_FILE}"
        )


def check_image_names(names: list[str], path: Path) -> None:
    """Every image name stays inside the image directory: a relative path with no ``..``.

    The names are joined under ``loose_crop/`` and opened by extraction actors on every node,
    so a meta file must not be able to point them at ``/etc/passwd`` or ``../../secret``.

    Raises:
        DataFormatError: naming ``path``, the 1-based line and the name.
    """
    joined = "\n" + "\n".join(names) + "\n"
    if not any(c in joined for c in ("/", "\\", "\0", "\n.\n", "\n..\n")):
        return  # plain file names (the real IJB-C's), checked in one pass over the text
    for i, name in enumerate(names):
        if "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name:
            continue
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\0" in name \
                or "." == name or any(p == "" for p in parts):
            raise DataFormatError(f"{path}, line {i + 1}: image name {name!r} leaves the image directory "
                                  "(names must be relative paths under loose_crop/, without '..')")


def read_ijbc_meta(
    root: str | os.PathLike[str],
    *,
    with_1n: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> IJBCMeta:
    """Read and cross-validate all IJB-C meta files under ``root`` (either root form).

    With ``cache_dir``, the parsed meta is kept there (see the module docstring) and reused
    while no meta file changes; the cache never changes a result or an error: a folder is
    cached only after it passed every check, and image names are checked again on a hit.
    A cache directory that cannot be written is skipped silently (the result is the same).
    """
    if cache_dir is None:
        return _parse_ijbc_meta(resolve_ijbc_dir(root), with_1n)
    meta, save = read_ijbc_meta_cached(root, cache_dir, with_1n=with_1n)
    if save is not None:
        save()
    return meta


def read_ijbc_meta_cached(
    root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *, with_1n: bool = True
) -> tuple[IJBCMeta, Callable[[], None] | None]:
    """:func:`read_ijbc_meta` through the cache in ``cache_dir``, saving left to the caller.

    Returns ``(meta, save)``: ``save`` is None on a cache hit; otherwise calling it writes the
    cache file (atomically; an unwritable directory is skipped), so a command can check its
    other inputs first and leave nothing behind when one is bad. The key is taken before the
    files are parsed: a file changed meanwhile gives a key the next run does not match.
    """
    ijbc = resolve_ijbc_dir(root)
    files = [TID_MID_FILE, NAME_5PTS_FILE, PAIR_LABEL_FILE]
    if with_1n:
        files += [GALLERY1_FILE, GALLERY2_FILE, PROBE_FILE]
    key = _meta_key(ijbc / "meta", files)
    if key is None:  # a file is missing: the parser names it
        return _parse_ijbc_meta(ijbc, with_1n), None
    path = Path(cache_dir) / f"ijbc-meta-{key}.npz"
    cached = _load_meta_cache(path, ijbc, with_1n)
    if cached is not None:
        check_image_names(cached.image_names, ijbc / "meta" / TID_MID_FILE)
        return cached, None
    meta = _parse_ijbc_meta(ijbc, with_1n)

    def save() -> None:
        try:
            _save_meta_cache(path, meta)
        except OSError:
            pass  # read-only or full cache directory: only the next run pays the parse again

    return meta, save


_HEAD_BYTES = 1 << 20
#: Format version of the cache file; part of its key, so a new layout never reads an old file.
_CACHE_VERSION = 2


def _meta_key(meta: Path, files: list[str]) -> str | None:
    """Hash of the meta folder's path and each file's size, mtime and first MB (None: a file is missing)."""
    h = hashlib.sha256(f"ijbc-meta v{_CACHE_VERSION}\n{meta.resolve()}\n".encode())
    for name in files:
        p = meta / name
        try:
            st = p.stat()
            with open(p, "rb") as f:
                head = f.read(_HEAD_BYTES)
        except OSError:
            return None
        h.update(f"{name} {st.st_size} {st.st_mtime_ns}\n".encode())
        h.update(hashlib.sha256(head).digest())
    return h.hexdigest()[:24]


_CACHE_ARRAYS = (
    "names", "templates", "medias", "landmarks", "scores", "pairs", "pair_labels",
    "g1_templates", "g1_subjects", "g2_templates", "g2_subjects", "p_templates", "p_subjects",
)


def _save_meta_cache(path: Path, meta: IJBCMeta) -> None:
    """Write ``meta`` as an uncompressed npz (temp file + rename; names as one UTF-8 blob)."""
    pairs = meta.pairs
    if pairs.size and -(1 << 31) <= pairs.min() and pairs.max() < (1 << 31):
        pairs = pairs.astype(np.int32)  # halves the largest array (and stays int32 on load)
    arrays = {
        "names": np.frombuffer("\n".join(meta.image_names).encode("utf-8"), dtype=np.uint8),
        "templates": meta.templates, "medias": meta.medias, "landmarks": meta.landmarks,
        "scores": meta.scores, "pairs": pairs, "pair_labels": meta.pair_labels,
        "g1_templates": meta.gallery1.templates, "g1_subjects": meta.gallery1.subjects,
        "g2_templates": meta.gallery2.templates, "g2_subjects": meta.gallery2.subjects,
        "p_templates": meta.probes.templates, "p_subjects": meta.probes.subjects,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _mapped_npz(path: Path) -> dict[str, np.ndarray]:
    """Each member of an uncompressed ``.npz`` as a read-only array on one map of the file.

    Every member's bytes are checked against the CRC-32 in the zip directory before use, and
    object arrays are refused (nothing is unpickled). Raises ValueError (or OSError,
    zipfile.BadZipFile) for anything else than a whole, plain, stored npz.
    """
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    out: dict[str, np.ndarray] = {}
    for zi in infos:
        if zi.compress_type != zipfile.ZIP_STORED or not zi.filename.endswith(".npy"):
            raise ValueError(f"{zi.filename}: not a stored .npy member")
        local = bytes(buf[zi.header_offset : zi.header_offset + 30])
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{zi.filename}: no local header")
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        start = zi.header_offset + 30 + n_name + n_extra
        data = buf[start : start + zi.file_size]
        if len(data) != zi.file_size or zlib.crc32(data) != zi.CRC:
            raise ValueError(f"{zi.filename}: CRC-32 mismatch")
        head = io.BytesIO(bytes(data[: min(len(data), 1 << 16)]))
        version = np.lib.format.read_magic(head)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(head)
        if dtype.hasobject:
            raise ValueError(f"{zi.filename}: object array")
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
        out[zi.filename[: -len(".npy")]] = arr.reshape(shape, order="F" if fortran else "C")
    return out


def _load_meta_cache(path: Path, ijbc: Path, with_1n: bool) -> IJBCMeta | None:
    """The cached meta, or None when there is none or it does not load whole and consistent.

    A damaged file is caught by the zip members' CRC-32 (checked before any array is used) and
    by the shape/dtype checks below; it is then rebuilt, never trusted.
    """
    if not path.is_file():
        return None
    try:
        a = _mapped_npz(path)
        if sorted(a) != sorted(_CACHE_ARRAYS):
            return None
        names = a["names"].tobytes().decode("utf-8").split("\n") if a["names"].size else []
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    n = len(names)
    ints = [k for k in _CACHE_ARRAYS if k not in ("names", "landmarks", "scores", "pair_labels")]
    if not (
        all(a[k].ndim == 1 and a[k].dtype.kind == "i" for k in ints if k != "pairs")
        and a["pairs"].ndim == 2 and a["pairs"].shape[1] == 2 and a["pairs"].dtype.kind == "i"
        and a["templates"].shape == a["medias"].shape == a["scores"].shape == (n,)
        and a["landmarks"].shape == (n, 5, 2) and a["landmarks"].dtype == np.float32
        and a["scores"].dtype == np.float32 and a["pair_labels"].dtype == np.int8
        and a["pair_labels"].shape == (a["pairs"].shape[0],)
        and all(a[f"{g}_templates"].shape == a[f"{g}_subjects"].shape for g in ("g1", "g2", "p"))
        and (with_1n or a["g1_templates"].size + a["g2_templates"].size + a["p_templates"].size == 0)
    ):
        return None

    def ts(g: str) -> TemplateSubjects:
        return TemplateSubjects(a[f"{g}_templates"].astype(np.int64, copy=False),
                                a[f"{g}_subjects"].astype(np.int64, copy=False))

    return IJBCMeta(
        root=ijbc, image_names=names,
        templates=a["templates"].astype(np.int64, copy=False),
        medias=a["medias"].astype(np.int64, copy=False),
        landmarks=a["landmarks"], scores=a["scores"],
        pairs=a["pairs"], pair_labels=a["pair_labels"],
        gallery1=ts("g1"), gallery2=ts("g2"), probes=ts("p"),
    )


def _parse_ijbc_meta(ijbc: Path, with_1n: bool) -> IJBCMeta:
    """Read and cross-validate all IJB-C meta files of the ``IJBC`` directory ``ijbc``.

    Checks beyond the per-file ones: tid_mid and 5pts list the same images in the same
    order; every pair template and every 1:N template occurs in tid_mid; the two galleries
    share no template.

    Args:
        ijbc: the ``IJBC`` directory (holding ``meta/``).
        with_1n: also read the three 1:N CSVs (otherwise they are empty).
    """
    meta = ijbc / "meta"
    tid_path = meta / TID_MID_FILE
    pts_path = meta / NAME_5PTS_FILE
    pair_path = meta / PAIR_LABEL_FILE

    names, templates, medias = read_tid_mid(tid_path)
    check_image_names(names, tid_path)
    names_5, landmarks, scores = read_5pts_score(pts_path)
    if names_5 != names:
        for i, (a, b) in enumerate(zip(names, names_5)):
            if a != b:
                raise DataFormatError(
                    f"{pts_path} and {tid_path} differ at line {i + 1}: image {b!r} vs {a!r} "
                    "(both files must list the same images in the same order)"
                )
        raise DataFormatError(
            f"row count mismatch: {pts_path} has {len(names_5)} rows but {tid_path} has "
            f"{len(names)} (first differing line {min(len(names), len(names_5)) + 1}; both "
            "files must list the same images in the same order)"
        )

    known = np.unique(templates)
    pairs, pair_labels = read_pair_label(pair_path)
    _check_known_templates(pairs, known, pair_path, None, "template")

    g1 = g2 = probes = TemplateSubjects.empty()
    if with_1n:
        lists: list[tuple[TemplateSubjects, Path]] = []
        for fname in (GALLERY1_FILE, GALLERY2_FILE, PROBE_FILE):
            p = meta / fname
            rows = _read_1n_rows(p)
            ts, first_lines = _unique_templates(rows, p)
            _check_known_templates(ts.templates, known, p, first_lines, "TEMPLATE_ID")
            lists.append((ts, p))
        (g1, p1), (g2, p2), (probes, _) = lists
        shared = np.intersect1d(g1.templates, g2.templates)
        if shared.size:
            raise DataFormatError(
                f"{p1} and {p2} share {shared.size} template(s), e.g. TEMPLATE_ID "
                f"{int(shared[0])}; the two galleries must be disjoint"
            )

    return IJBCMeta(
        root=ijbc,
        image_names=names,
        templates=templates,
        medias=medias,
        landmarks=landmarks,
        scores=scores,
        pairs=pairs,
        pair_labels=pair_labels,
        gallery1=g1,
        gallery2=g2,
        probes=probes,
    )
