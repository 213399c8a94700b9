"""RecordIO + MS1M layout against a minimal independent writer written here from the spec."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.data import ms1m
from unibct_ray.data.recordio import RecordIOReader, RecordIOWriter, encode_record, pack_irheader, unpack_irheader
from unibct_ray.errors import DataFormatError

MAGIC = 0xCED7230A


def ref_frame(payload: bytes) -> bytes:
    """Spec-level framing, written independently: walk aligned words, cut at the magic."""
    words_end = len(payload) // 4 * 4
    chunks, start = [], 0
    for i in range(0, words_end, 4):
        if struct.unpack("<I", payload[i : i + 4])[0] == MAGIC:
            chunks.append(payload[start:i])
            start = i + 4
    chunks.append(payload[start:])
    out = b""
    for j, c in enumerate(chunks):
        flag = 0 if len(chunks) == 1 else (1 if j == 0 else (3 if j == len(chunks) - 1 else 2))
        out += struct.pack("<II", MAGIC, (flag << 29) | len(c)) + c + b"\0" * ((4 - len(c) % 4) % 4)
    return out


def ref_irheader(label, payload: bytes, rid: int = 0) -> bytes:
    if np.ndim(label):
        lab = list(label)
        return struct.pack("<IfQQ", len(lab), 0.0, rid, 0) + struct.pack(f"<{len(lab)}f", *lab) + payload
    return struct.pack("<IfQQ", 0, float(label), rid, 0) + payload


def write_ref_rec(tmp: Path, records: dict[int, bytes], order: list[int]) -> tuple[Path, Path]:
    """Write records in a given *physical* order with a matching .idx."""
    rec, idx = tmp / "train.rec", tmp / "train.idx"
    blob, lines = b"", []
    for k in order:
        lines.append(f"{k}\t{len(blob)}")
        blob += ref_frame(records[k])
    rec.write_bytes(blob)
    idx.write_text("\n".join(lines) + "\n")
    return rec, idx


def fake_jpeg(seed: int, n: int = 37) -> bytes:
    rng = np.random.default_rng(seed)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, n, dtype=np.uint8).tobytes() + b"\xff\xd9"


MAGIC_LE = struct.pack("<I", MAGIC)


def test_framing_matches_reference_including_split_records():
    cases = [
        b"",
        b"abc",
        b"abcd",
        MAGIC_LE,  # the whole payload is the magic: two empty chunks
        b"1234" + MAGIC_LE + b"5678" + MAGIC_LE + MAGIC_LE + b"xy",  # several cuts, adjacent
        b"12" + MAGIC_LE + b"34",  # unaligned magic: no cut
        b"x" * 4 + MAGIC_LE,  # magic as the last word
    ]
    for payload in cases:
        assert encode_record(payload) == ref_frame(payload), payload


def test_reader_reads_independent_file_in_any_physical_order(tmp_path):
    jpegs = {k: fake_jpeg(k) for k in range(1, 6)}
    jpegs[3] = b"\xff\xd8\xff\xe0" + b"\0" * 4 + MAGIC_LE + b"tail" + MAGIC_LE + b"end"  # cflag 1/2/3
    labels = {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    records = {k: ref_irheader([float(labels[k]), 0.0] if k % 2 else float(labels[k]), jpegs[k], k) for k in jpegs}
    records[6] = ref_irheader([1.0, 3.0], b"")  # identity 0: keys [1, 3)
    records[7] = ref_irheader([3.0, 6.0], b"")  # identity 1: keys [3, 6)
    records[0] = ref_irheader([6.0, 8.0], b"")  # header, written last physically
    rec, idx = write_ref_rec(tmp_path, records, order=[5, 2, 6, 1, 3, 7, 4, 0])
    with RecordIOReader(rec, idx) as r:
        head = ms1m.read_ms1m_header(r)
        assert (head.image_end, head.second) == (6, 8)
        np.testing.assert_array_equal(ms1m.image_keys(r, head), [1, 2, 3, 4, 5])
        for k in range(1, 6):
            label, img = ms1m.read_image(r, k)
            assert label == labels[k]
            assert img == jpegs[k]
        h, rest = r.read_with_header(7)
        np.testing.assert_array_equal(h.label, [3.0, 6.0])
        assert rest == b""
        # a sequential scan sees every record in file order
        assert [p for _, p in r.scan()] == [records[k] for k in [5, 2, 6, 1, 3, 7, 4, 0]]


def test_header_b_holding_class_count_is_ignored(tmp_path):
    records = {1: ref_irheader(0.0, fake_jpeg(1)), 2: ref_irheader(1.0, fake_jpeg(2))}
    records[0] = ref_irheader([3.0, 2.0], b"")  # b = number of classes, as split tools write
    rec, idx = write_ref_rec(tmp_path, records, order=[0, 1, 2])
    with RecordIOReader(rec, idx) as r:
        np.testing.assert_array_equal(ms1m.image_keys(r), [1, 2])


def test_irheader_scalar_and_array_labels_roundtrip():
    h, rest = unpack_irheader(pack_irheader(7.0, b"img", id=9))
    assert (h.flag, h.label, h.id, rest) == (0, 7.0, 9, b"img")
    h, rest = unpack_irheader(pack_irheader([4.0, 2.5, 1.0], b"xyz"))
    assert h.flag == 3 and h.class_label == 4.0 and rest == b"xyz"
    assert pack_irheader([4.0, 2.5], b"q") == ref_irheader([4.0, 2.5], b"q")


def test_project_writer_roundtrip_and_reference_bytes(tmp_path):
    imgs = [(0, fake_jpeg(1)), (0, b"\xff\xd8\xff" + b"\0" + MAGIC_LE * 3), (1, fake_jpeg(3)), (2, fake_jpeg(4))]
    head = ms1m.write_ms1m(tmp_path / "train.rec", imgs)
    assert (head.image_end, head.second) == (5, 8)
    # no temporaries left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.idx", "train.rec"]
    with RecordIOReader(tmp_path / "train.rec") as r:
        assert [ms1m.read_image(r, k) for k in range(1, 5)] == imgs
        np.testing.assert_array_equal(r.read_with_header(5)[0].label, [1.0, 3.0])
        np.testing.assert_array_equal(r.read_with_header(7)[0].label, [4.0, 5.0])
        # byte-level: image record 2 framed exactly as the reference framing
        off = r.offset(2)
        expected = ref_frame(ref_irheader([0.0, 0.0], imgs[1][1], 2))
        assert (tmp_path / "train.rec").read_bytes()[off : off + len(expected)] == expected


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordIOWriter(tmp_path / "x.rec") as w:
            w.write(1, b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- bad input: one clear message naming the file and the key/offset --------------------

def _good(tmp_path):
    records = {1: ref_irheader(0.0, fake_jpeg(1)), 2: ref_irheader(0.0, fake_jpeg(2)), 0: ref_irheader([3.0, 3.0], b"")}
    return write_ref_rec(tmp_path, records, order=[0, 1, 2])


def test_garbage_rec(tmp_path):
    rec, idx = _good(tmp_path)
    rec.write_bytes(np.random.default_rng(0).integers(0, 256, rec.stat().st_size, dtype=np.uint8).tobytes())
    with RecordIOReader(rec, idx) as r, pytest.raises(DataFormatError, match=r"train\.rec.*key 0.*magic"):
        ms1m.read_ms1m_header(r)


def test_truncated_rec(tmp_path):
    rec, idx = _good(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 10])
    with RecordIOReader(rec, idx) as r, pytest.raises(DataFormatError, match=r"train\.rec.*key 2.*truncated"):
        r.read(2)


def test_idx_offset_past_end(tmp_path):
    rec, idx = _good(tmp_path)
    idx.write_text(idx.read_text() + f"9\t{rec.stat().st_size + 100}\n")
    with pytest.raises(DataFormatError, match=r"train\.idx:4: key 9 .*past the end"):
        RecordIOReader(rec, idx)


def test_idx_garbage_line(tmp_path):
    rec, idx = _good(tmp_path)
    idx.write_text("0\t0\n1\tabc\n")
    with pytest.raises(DataFormatError, match=r"train\.idx:2: .*integers"):
        RecordIOReader(rec, idx)


def test_missing_files(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.rec: RecordIO file not found"):
        RecordIOReader(tmp_path / "nope.rec")
    rec, idx = _good(tmp_path)
    idx.unlink()
    with pytest.raises(DataFormatError, match=r"train\.idx: index file not found"):
        RecordIOReader(rec)


def test_not_an_image(tmp_path):
    records = {1: ref_irheader(0.0, b"GIF89a-not-supported"), 0: ref_irheader([2.0, 2.0], b"")}
    rec, idx = write_ref_rec(tmp_path, records, order=[0, 1])
    with RecordIOReader(rec, idx) as r, pytest.raises(DataFormatError, match=r"key 1: image bytes are not a JPEG"):
        ms1m.read_image(r, 1)


def test_header_points_to_missing_keys(tmp_path):
    records = {1: ref_irheader(0.0, fake_jpeg(1)), 0: ref_irheader([4.0, 4.0], b"")}
    rec, idx = write_ref_rec(tmp_path, records, order=[0, 1])
    with RecordIOReader(rec, idx) as r, pytest.raises(DataFormatError, match=r"2 are missing .*first: 2"):
        ms1m.image_keys(r)


def test_reader_pickles_for_ray_tasks(tmp_path):
    import pickle

    rec, idx = _good(tmp_path)
    with RecordIOReader(rec, idx) as r:
        r.read(1)
        r2 = pickle.loads(pickle.dumps(r))
        assert r2.read(2) == r.read(2)
        r2.close()
