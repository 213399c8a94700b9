"""`data convert` on a real local Ray: shards equal the records; bad input fails cleanly."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unibct_ray.cli import main
from unibct_ray.data.ms1m import write_ms1m
from unibct_ray.data.shards import read_columns, read_manifest


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def small_rec(tmp_path):
    sizes = [3, 1, 5, 15, 2, 4]
    images = [(c, jpeg(100 * c + j)) for c, n in enumerate(sizes) for j in range(n)]
    write_ms1m(tmp_path / "train.rec", images)
    return tmp_path / "train.rec", images


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_roundtrip(ray_session, small_rec, tmp_path, capsys):
    rec, images = small_rec
    out = tmp_path / "shards"
    code, stdout, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(out),
                                 "--rows-per-shard", "7", "--no-progress", "--verify", "decode"], capsys)
    assert code == 0, err
    m = read_manifest(out)
    assert (m.rows, m.classes, len(m.shards)) == (30, 6, 5)  # ceil(30 / 7) shards
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["source"]["rec_bytes"] == rec.stat().st_size
    assert doc["source"]["rec"].endswith("train.rec")
    got = []
    for s in m.shards:
        got.extend(pq.read_table(out / s.file).to_pylist())
    # rows in the seeded permutation of the keys 1..30 (seed 0 by default)
    order = np.random.default_rng(0).permutation(30)
    assert [r["index"] for r in got] == (order + 1).tolist()
    assert [(r["label"], r["image"]) for r in got] == [images[i] for i in order]  # bytes exactly as stored
    cols = read_columns(m, ["label"])
    np.testing.assert_array_equal(cols["label"], [images[i][0] for i in order])
    assert len({r["label"] for r in got[:7]}) >= 4  # the first shard mixes classes (record order: 2)
    # nothing but the shard set next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "train.idx", "train.rec"]


def test_convert_in_record_order(ray_session, small_rec, tmp_path, capsys):
    rec, images = small_rec
    out = tmp_path / "shards"
    code, _, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(out), "--rows-per-shard", "7",
                            "--no-progress", "--record-order"], capsys)
    assert code == 0, err
    got = [r for s in read_manifest(out).shards for r in pq.read_table(out / s.file).to_pylist()]
    assert [r["index"] for r in got] == list(range(1, 31))
    assert [(r["label"], r["image"]) for r in got] == images


def test_convert_refuses_existing_output(ray_session, small_rec, tmp_path, capsys):
    rec, _ = small_rec
    out = tmp_path / "shards"
    out.mkdir()
    code, _, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "already exists" in err and str(out) in err


def _assert_clean_failure(code, err, tmp_path, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    for n in needles:
        assert n in lines[0], (n, lines[0])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("train.rec", "train.idx")]
    assert leftovers == [], leftovers  # no partial output


def test_convert_garbage_rec(ray_session, small_rec, tmp_path, capsys):
    rec, _ = small_rec
    rec.write_bytes(np.random.default_rng(1).integers(0, 256, rec.stat().st_size, dtype=np.uint8).tobytes())
    code, _, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_clean_failure(code, err, tmp_path, "train.rec", "key 0", "magic")


def test_convert_truncated_rec(ray_session, small_rec, tmp_path, capsys):
    rec, _ = small_rec
    data = rec.read_bytes()
    # cut inside the image records, keep the index: the tasks hit the truncation
    from unibct_ray.data.recordio import read_idx

    keys, offsets = read_idx(rec.with_suffix(".idx"))
    cut = int(offsets[keys == 20][0]) + 12
    header_at = int(offsets[keys == 0][0])
    rec.write_bytes(data[:cut])
    # the header record (written last) is now past the end: reported from the .idx check
    code, _, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_clean_failure(code, err, tmp_path, "train.idx", "past the end")
    assert header_at > cut


def test_convert_truncated_record_inside(ray_session, small_rec, tmp_path, capsys):
    rec, _ = small_rec
    data = bytearray(rec.read_bytes())
    from unibct_ray.data.recordio import read_idx

    keys, offsets = read_idx(rec.with_suffix(".idx"))
    off = int(offsets[keys == 9][0])
    # claim a chunk longer than the file: the reader must say 'truncated' with the key
    data[off + 4 : off + 8] = (len(data)).to_bytes(4, "little")
    rec.write_bytes(bytes(data))
    code, _, err = run_cli(["data", "convert", "--rec", str(rec), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_clean_failure(code, err, tmp_path, "train.rec", "key 9", "truncated")


def test_convert_undecodable_image(ray_session, tmp_path, capsys):
    bad = b"\xff\xd8\xff\xe0" + b"\x00" * 40  # JPEG signature, garbage after it
    write_ms1m(tmp_path / "train.rec", [(0, jpeg(1)), (0, bad), (1, jpeg(2))])
    args = ["data", "convert", "--rec", str(tmp_path / "train.rec"), "--out", str(tmp_path / "o"), "--no-progress"]
    code, _, err = run_cli(args + ["--verify", "header"], capsys)
    _assert_clean_failure(code, err, tmp_path, "train.rec", "key 2", "does not decode")


def test_convert_missing_file(ray_session, tmp_path, capsys):
    code, _, err = run_cli(["data", "convert", "--rec", str(tmp_path / "nope.rec"), "--out", str(tmp_path / "o"),
                            "--no-progress"], capsys)
    assert code == 2 and "nope.rec: RecordIO file not found" in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(ray_session, tmp_path):
    from unibct_ray.errors import DataFormatError

    with pytest.raises(DataFormatError):
        main(["--debug", "data", "convert", "--rec", str(tmp_path / "nope.rec"), "--out", str(tmp_path / "o")])
