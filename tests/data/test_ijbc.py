"""IJB-C meta readers/writers on tiny hand-written files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.data import ijbc, ijbc_writers
from unibct_ray.errors import DataFormatError, UserError

# Non-contiguous template ids (1, 7, 42, 1000); several images per template.
TID_MID = """\
1.jpg 1 100
2.jpg 1 100
3.jpg 7 101
4.jpg 7 102
5.jpg 42 103
6.jpg 1000 104
7.jpg 1000 104
"""

PTS = """\
1.jpg 38.2946 51.6963 73.5318 51.5014 56.0252 71.7366 41.5493 92.3655 70.7299 92.2041 0.998
2.jpg 10 20 30 40 50 60 70 80 90 100 0.5
3.jpg 1.5 2.5 3.5 4.5 5.5 6.5 7.5 8.5 9.5 10.5 0.25
4.jpg 0 0 0 0 0 0 0 0 0 0 1
5.jpg 100.125 0.001 3 3 3 3 3 3 3 3 0.75
6.jpg 1 2 3 4 5 6 7 8 9 10 0.1
7.jpg -1 -2 -3 -4 -5 -6 -7 -8 -9 -10 0.2
"""

PAIRS = """\
1 7 0
1 42 0
7 42 0
1000 1 0
42 1000 1
"""

# Real files carry more columns than the three we need.
G1 = """\
TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT
1000,12,img/6.jpg,6,10,20,30,40
1,11,img/1.jpg,1,10,20,30,40
1,11,img/2.jpg,2,11,21,31,41
1000,12,img/7.jpg,7,10,20,30,40
"""

# Columns in another order: they are found by name.
G2 = """\
SUBJECT_ID,FILENAME,TEMPLATE_ID
13,img/3.jpg,7
13,img/4.jpg,7
"""

PROBES = """\
TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID
42,11,img/5.jpg,5
42,11,frames/5_1.png,5
7,13,img/3.jpg,3
"""

FILES = {
    ijbc.TID_MID_FILE: TID_MID,
    ijbc.NAME_5PTS_FILE: PTS,
    ijbc.PAIR_LABEL_FILE: PAIRS,
    ijbc.GALLERY1_FILE: G1,
    ijbc.GALLERY2_FILE: G2,
    ijbc.PROBE_FILE: PROBES,
}


def _make_root(tmp_path: Path, **overrides: str | None) -> Path:
    """Write the tiny meta under ``tmp_path/IJBC/meta``; override/drop files by name."""
    meta = tmp_path / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (tmp_path / "IJBC" / "loose_crop").mkdir()
    files = dict(FILES)
    for key, text in overrides.items():
        files[getattr(ijbc, key)] = text
    for name, text in files.items():
        if text is not None:
            (meta / name).write_text(text)
    return tmp_path


def _error(tmp_path: Path, **overrides: str | None) -> str:
    root = _make_root(tmp_path, **overrides)
    with pytest.raises(DataFormatError) as exc:
        ijbc.read_ijbc_meta(root)
    return str(exc.value)


# --------------------------------------------------------------------------- happy path


def test_read_meta_both_root_forms(tmp_path: Path) -> None:
    root = _make_root(tmp_path)
    for form in (root, root / "IJBC", str(root)):
        meta = ijbc.read_ijbc_meta(form)
        assert meta.root == root / "IJBC"
        assert meta.image_dir == root / "IJBC" / "loose_crop"
    assert ijbc.resolve_ijbc_dir(root) == ijbc.resolve_ijbc_dir(root / "IJBC") == root / "IJBC"

    assert meta.image_names == [f"{i}.jpg" for i in range(1, 8)]
    assert meta.n_images == 7 and meta.n_pairs == 5
    np.testing.assert_array_equal(meta.templates, [1, 1, 7, 7, 42, 1000, 1000])
    np.testing.assert_array_equal(meta.medias, [100, 100, 101, 102, 103, 104, 104])
    assert meta.templates.dtype == np.int64 and meta.medias.dtype == np.int64
    assert meta.landmarks.dtype == np.float32 and meta.landmarks.shape == (7, 5, 2)
    np.testing.assert_allclose(meta.landmarks[0, 1], [73.5318, 51.5014], atol=1e-4)
    np.testing.assert_allclose(meta.landmarks[4, 0], [100.125, 0.001], atol=1e-5)
    np.testing.assert_allclose(meta.landmarks[6, 4], [-9, -10])
    assert meta.scores.dtype == np.float32
    np.testing.assert_allclose(meta.scores, [0.998, 0.5, 0.25, 1, 0.75, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(meta.pairs, [[1, 7], [1, 42], [7, 42], [1000, 1], [42, 1000]])
    assert meta.pairs.dtype == np.int64
    np.testing.assert_array_equal(meta.pair_labels, [0, 0, 0, 0, 1])
    assert meta.pair_labels.dtype == np.int8

    # Unique templates, sorted, one subject each.
    np.testing.assert_array_equal(meta.gallery1.templates, [1, 1000])
    np.testing.assert_array_equal(meta.gallery1.subjects, [11, 12])
    np.testing.assert_array_equal(meta.gallery2.templates, [7])
    np.testing.assert_array_equal(meta.gallery2.subjects, [13])
    np.testing.assert_array_equal(meta.probes.templates, [7, 42])
    np.testing.assert_array_equal(meta.probes.subjects, [13, 11])
    assert meta.has_1n and len(meta.probes) == 2


def test_without_1n_the_csvs_are_not_needed(tmp_path: Path) -> None:
    root = _make_root(tmp_path, GALLERY1_FILE=None, GALLERY2_FILE=None, PROBE_FILE=None)
    meta = ijbc.read_ijbc_meta(root, with_1n=False)
    assert not meta.has_1n and len(meta.gallery1) == 0
    assert meta.gallery1.templates.dtype == np.int64
    with pytest.raises(DataFormatError, match=ijbc.GALLERY1_FILE):
        ijbc.read_ijbc_meta(root)


def test_tolerates_crlf_tabs_trailing_blank_lines_and_missing_final_newline(
    tmp_path: Path,
) -> None:
    p = tmp_path / "pairs.txt"
    p.write_bytes(b"1\t7  0\r\n 42 1000 1\r\n\n  \n")
    pairs, labels = ijbc.read_pair_label(p)
    np.testing.assert_array_equal(pairs, [[1, 7], [42, 1000]])
    np.testing.assert_array_equal(labels, [0, 1])
    p.write_bytes(b"1 7 0\n42 1000 1")
    assert ijbc.read_pair_label(p)[0].shape == (2, 2)
    t = tmp_path / "tid.txt"
    t.write_bytes(b"a.jpg 1 2\r\nb.jpg 3 4")
    names, templates, medias = ijbc.read_tid_mid(t)
    assert names == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(templates, [1, 3])
    np.testing.assert_array_equal(medias, [2, 4])


def test_numeric_parser_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny chunks exercise the line-aligned chunking used for the 300 MB pair file.
    monkeypatch.setattr(ijbc, "_CHUNK_BYTES", 16)
    rng = np.random.default_rng(0)
    pairs = rng.integers(1, 10**6, size=(500, 2))
    labels = rng.integers(0, 2, size=500)
    text = "".join(f"{a} {b} {c}\n" for (a, b), c in zip(pairs.tolist(), labels.tolist()))
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    got_pairs, got_labels = ijbc.read_pair_label(p)
    np.testing.assert_array_equal(got_pairs, pairs)
    np.testing.assert_array_equal(got_labels, labels)

    lines = text.splitlines()
    lines[333] = "5 6"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"pairs\.txt, line 334: expected 3 fields"):
        ijbc.read_pair_label(p)
    lines[333] = "5 six 1"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"line 334: field 2 'six' is not an integer"):
        ijbc.read_pair_label(p)
    lines[333] = ""
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"line 334: empty line"):
        ijbc.read_pair_label(p)


# --------------------------------------------------------------------------- errors


def test_root_without_meta_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an IJB-C root"):
        ijbc.read_ijbc_meta(tmp_path)


@pytest.mark.parametrize(
    "key", ["TID_MID_FILE", "NAME_5PTS_FILE", "PAIR_LABEL_FILE", "PROBE_FILE"]
)
def test_missing_file(tmp_path: Path, key: str) -> None:
    msg = _error(tmp_path, **{key: None})
    assert getattr(ijbc, key) in msg and "not found" in msg


@pytest.mark.parametrize(
    "key, text, line, what",
    [
        ("TID_MID_FILE", TID_MID.replace("3.jpg 7 101", "3.jpg 7"), 3, "expected 3 fields"),
        ("TID_MID_FILE", TID_MID.replace("4.jpg 7 102", "4.jpg 7 102 9"), 4, "found 4"),
        ("TID_MID_FILE", TID_MID.replace("5.jpg 42 103", "5.jpg"), 5, "found 1"),
        ("TID_MID_FILE", TID_MID.replace("2.jpg 1 100", "2.jpg one 100"), 2, "'one'"),
        ("TID_MID_FILE", TID_MID.replace("2.jpg 1 100", "2.jpg 1 1.5"), 2, "not an integer"),
        ("TID_MID_FILE", TID_MID.replace("3.jpg", "\n3.jpg"), 3, "empty line"),
        ("NAME_5PTS_FILE", PTS.replace(" 0.5\n", "\n"), 2, "found 11"),
        ("NAME_5PTS_FILE", PTS.replace("3.jpg 1.5", "3.jpg x1.5"), 3, "field 2 'x1.5'"),
        ("NAME_5PTS_FILE", PTS.replace("2.jpg 10 20", "2.jpg nan 20"), 2, "x1 is nan"),
        ("NAME_5PTS_FILE", PTS.replace("80 90", "80 inf"), 2, "x5 is inf"),
        ("NAME_5PTS_FILE", PTS.replace("0.25", "-inf"), 3, "score is -inf"),
        ("PAIR_LABEL_FILE", PAIRS.replace("1 42 0", "1 42"), 2, "expected 3 fields"),
        ("PAIR_LABEL_FILE", PAIRS.replace("1000 1 0", "1000 x 0"), 4, "'x' is not an integer"),
        ("PAIR_LABEL_FILE", PAIRS.replace("7 42 0", "7 42 2"), 3, "label 2 is not 0"),
        ("PAIR_LABEL_FILE", PAIRS.replace("7 42 0", "7 42 -1"), 3, "label -1"),
        ("PAIR_LABEL_FILE", PAIRS.replace("1000 1 0", "1000 5 0"), 4, "template 5 does not"),
        ("PAIR_LABEL_FILE", "\n" + PAIRS, 1, "empty line"),
        ("GALLERY1_FILE", G1.replace("1,11,img/2.jpg", "1,99,img/2.jpg"), 4, "template 1 has"),
        ("GALLERY1_FILE", G1.replace("1,11,img/1.jpg", "x,11,img/1.jpg"), 3, "'x' is not an"),
        ("GALLERY1_FILE", G1.replace("1,11,img/1.jpg,1,10,20,30,40", "1,11"), 3, "2 fields"),
        ("GALLERY2_FILE", G2.replace("13,img/4.jpg,7", "13,img/4.jpg,8"), 3, "TEMPLATE_ID 8"),
        ("PROBE_FILE", PROBES.replace("FILENAME", "FILE"), 1, "missing column(s) FILENAME"),
    ],
)
def test_format_errors_name_file_and_line(
    tmp_path: Path, key: str, text: str, line: int, what: str
) -> None:
    msg = _error(tmp_path, **{key: text})
    assert getattr(ijbc, key) in msg, msg
    assert f"line {line}" in msg, msg
    assert what in msg, msg


def test_subject_conflict_message_names_both_lines(tmp_path: Path) -> None:
    msg = _error(tmp_path, GALLERY1_FILE=G1.replace("1000,12,img/7.jpg", "1000,15,img/7.jpg"))
    assert ijbc.GALLERY1_FILE in msg and "line 5" in msg and "line 2" in msg
    assert "SUBJECT_ID 15" in msg and "SUBJECT_ID 12" in msg


def test_row_count_mismatch_names_both_files(tmp_path: Path) -> None:
    msg = _error(tmp_path, NAME_5PTS_FILE="".join(PTS.splitlines(keepends=True)[:5]))
    assert ijbc.NAME_5PTS_FILE in msg and ijbc.TID_MID_FILE in msg
    assert "5 rows" in msg and "7" in msg and "line 6" in msg


def test_name_order_mismatch_names_both_files_and_line(tmp_path: Path) -> None:
    lines = PTS.splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    msg = _error(tmp_path, NAME_5PTS_FILE="".join(lines))
    assert ijbc.NAME_5PTS_FILE in msg and ijbc.TID_MID_FILE in msg
    assert "line 3" in msg and "'4.jpg'" in msg and "'3.jpg'" in msg


def test_galleries_must_be_disjoint(tmp_path: Path) -> None:
    msg = _error(tmp_path, GALLERY2_FILE=G2 + "14,img/6.jpg,1000\n")
    assert ijbc.GALLERY1_FILE in msg and ijbc.GALLERY2_FILE in msg and "1000" in msg


def test_empty_files(tmp_path: Path) -> None:
    assert "no rows" in _error(tmp_path / "a", PAIR_LABEL_FILE="\n\n")
    header_only = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    assert "no data rows" in _error(tmp_path / "b", GALLERY2_FILE=header_only)
    assert "header" in _error(tmp_path / "c", PROBE_FILE="")


# --------------------------------------------------------------------------- writers


def test_writer_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 50
    names = [f"{i}.jpg" for i in range(1, n + 1)]
    templates = (np.arange(n) % 7 + 1) * 7  # 7, 14, ..., 49
    medias = rng.integers(0, 10**9, n)
    landmarks = rng.uniform(-500, 2000, (n, 5, 2)).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    pairs = rng.choice(np.unique(templates), size=(200, 2))
    labels = rng.integers(0, 2, 200)
    g1_rows = np.array([7, 7, 14, 21, 21, 21])
    g2_rows = np.array([28, 35])
    probe_rows = np.array([42, 42, 49])

    meta = tmp_path / "IJBC" / "meta"  # the writers create missing directories
    ijbc_writers.write_tid_mid(meta / ijbc.TID_MID_FILE, names, templates, medias)
    ijbc_writers.write_5pts_score(meta / ijbc.NAME_5PTS_FILE, names, landmarks, scores)
    ijbc_writers.write_pair_label(meta / ijbc.PAIR_LABEL_FILE, pairs, labels)
    g1_files = [f"img/{i}.jpg" for i in range(6)]
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY1_FILE, g1_rows, g1_rows + 1, g1_files)
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY2_FILE, g2_rows, g2_rows + 1, ["a,b.jpg", "c.jpg"])
    ijbc_writers.write_1n_csv(meta / ijbc.PROBE_FILE, probe_rows, probe_rows * 0 + 5, ["x", "y", "z"])
    # Atomic writes leave no temporaries behind, and files get normal permissions.
    assert sorted(os.listdir(meta)) == sorted(FILES)
    assert (meta / ijbc.TID_MID_FILE).stat().st_mode & 0o044  # group/other readable (umask 022)

    got = ijbc.read_ijbc_meta(tmp_path)
    assert got.image_names == names
    np.testing.assert_array_equal(got.templates, templates)
    np.testing.assert_array_equal(got.medias, medias)
    np.testing.assert_allclose(got.landmarks, landmarks, atol=1e-4)
    np.testing.assert_array_equal(got.landmarks, landmarks)  # %.9g round-trips float32
    np.testing.assert_array_equal(got.scores, scores)
    np.testing.assert_array_equal(got.pairs, pairs)
    np.testing.assert_array_equal(got.pair_labels, labels)
    np.testing.assert_array_equal(got.gallery1.templates, [7, 14, 21])
    np.testing.assert_array_equal(got.gallery1.subjects, [8, 15, 22])
    np.testing.assert_array_equal(got.gallery2.templates, [28, 35])
    np.testing.assert_array_equal(got.probes.subjects, [5, 5])
    header = (meta / ijbc.GALLERY1_FILE).read_text().splitlines()[0]
    assert header == "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"

    # Overwriting replaces the whole file.
    ijbc_writers.write_pair_label(meta / ijbc.PAIR_LABEL_FILE, np.array([[-3, 10**12]]), np.array([1]))
    assert (meta / ijbc.PAIR_LABEL_FILE).read_text() == "-3 1000000000000 1\n"


def test_writers_reject_bad_input(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    with pytest.raises(ValueError):
        ijbc_writers.write_tid_mid(p, ["a b.jpg"], np.array([1]), np.array([2]))
    with pytest.raises(ValueError):
        ijbc_writers.write_tid_mid(p, ["a.jpg"], np.array([1, 2]), np.array([2]))
    with pytest.raises(ValueError):
        ijbc_writers.write_5pts_score(p, ["a.jpg"], np.full((1, 5, 2), np.nan), np.array([1.0]))
    with pytest.raises(ValueError):
        ijbc_writers.write_pair_label(p, np.array([[1, 2]]), np.array([2]))
    with pytest.raises(ValueError):
        ijbc_writers.write_1n_csv(p, np.array([1, 1]), np.array([3, 4]), ["a", "b"])
    assert not p.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.jpg", "..", "a//b.jpg",
                                 "C:/windows/x.jpg", "\\\\server\\share\\x.jpg"])
def test_image_names_cannot_leave_the_image_directory(tmp_path, bad):
    """A meta file's names are joined under loose_crop/ and opened on every node."""
    names = ["1.jpg", "sub/2.jpg", bad, "4.jpg"]
    templates = np.array([1, 1, 2, 2])
    meta = tmp_path / "IJBC" / "meta"
    ijbc_writers.write_tid_mid(meta / ijbc.TID_MID_FILE, names, templates, templates)
    ijbc_writers.write_5pts_score(meta / ijbc.NAME_5PTS_FILE, names, np.zeros((4, 5, 2), np.float32),
                                  np.ones(4, np.float32))
    ijbc_writers.write_pair_label(meta / ijbc.PAIR_LABEL_FILE, np.array([[1, 2]]), np.array([0]))
    with pytest.raises(DataFormatError) as e:
        ijbc.read_ijbc_meta(tmp_path, with_1n=False)
    msg = str(e.value)
    assert ijbc.TID_MID_FILE in msg and "line 3" in msg and repr(bad) in msg and "leaves the image directory" in msg
    # the same folder with a plain name and a name in a subdirectory reads fine
    names[2] = "3.jpg"
    ijbc_writers.write_tid_mid(meta / ijbc.TID_MID_FILE, names, templates, templates)
    ijbc_writers.write_5pts_score(meta / ijbc.NAME_5PTS_FILE, names, np.zeros((4, 5, 2), np.float32),
                                  np.ones(4, np.float32))
    assert ijbc.read_ijbc_meta(tmp_path, with_1n=False).image_names == names
