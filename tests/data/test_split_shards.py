"""`data split` end to end on Parquet shard sets (written here with pyarrow, not the converter)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unibct_ray.cli import main
from unibct_ray.data.shards import read_manifest

SIZES = [1, 5, 15, 25, 2, 3, 1, 8, 4, 6]


def make_source(tmp_path):
    """A shard set with non-contiguous class ids and three shards cutting classes."""
    class_ids = [3, 4, 9, 10, 11, 20, 21, 22, 40, 41]
    labels = np.repeat(class_ids, SIZES)
    index = np.arange(1, len(labels) + 1)
    images = [f"img{k}".encode() for k in index]
    src = tmp_path / "src"
    src.mkdir()
    cuts = [0, 17, 40, len(labels)]
    shards = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        pq.write_table(pa.table({"image": pa.array(images[a:b], pa.binary()), "label": labels[a:b],
                                 "index": index[a:b]}), src / f"part-{i:05d}.parquet")
        shards.append({"file": f"part-{i:05d}.parquet", "rows": b - a})
    (src / "manifest.json").write_text(json.dumps({
        "format": "unibct-ray/parquet-shards", "version": 1, "rows": len(labels), "classes": 10,
        "columns": ["image", "label", "index"], "shards": shards}))
    return src, labels, index


def read_set(d):
    m = read_manifest(d)
    t = pa.concat_tables([pq.read_table(p) for p in m.files])
    return m, {c: t.column(c).to_pylist() for c in t.column_names}


@pytest.mark.parametrize("scenario", ["extended-data", "extended-class", "open-data", "open-class"])
def test_split_sets(tmp_path, scenario, capsys):
    src, labels, index = make_source(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "split", "--src", str(src), "--scenario", scenario, "--ratio", "0.3",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "manifest.json").read_text())
    sides = {}
    for side in ("old", "new"):
        m, cols = read_set(out / side)
        sides[side] = cols
        assert summary[side]["rows"] == m.rows == len(cols["label"])
        # labels contiguous 0..C-1, order-preserving over the source classes
        assert sorted(set(cols["label"])) == list(range(m.classes))
        src_sorted = sorted(set(cols["source_label"]))
        assert all(src_sorted[l] == s for l, s in zip(cols["label"], cols["source_label"]))
        # rows intact: image bytes match their index, source label matches the source row
        lab_of = dict(zip(index.tolist(), labels.tolist()))
        assert all(img == f"img{k}".encode() for img, k in zip(cols["image"], cols["index"]))
        assert all(lab_of[k] == s for k, s in zip(cols["index"], cols["source_label"]))
    old_idx, new_idx = set(sides["old"]["index"]), set(sides["new"]["index"])
    # hand-computed: first round(10 * 0.3) = 3 classes; data-0.3 k per class:
    k = [1, 2, 4, 8, 1, 1, 1, 2, 1, 2]
    starts = np.r_[0, np.cumsum(SIZES)][:-1] + 1
    data_r = {int(s) + j for s, kk in zip(starts, k) for j in range(kk)}
    class_r = {int(i) for i, l in zip(index, labels) if l in (3, 4, 9)}
    everything = set(index.tolist())
    singles = {int(s) for s, n in zip(starts, SIZES) if n == 1}
    expect = {
        "extended-data": (data_r, everything),
        "extended-class": (class_r, everything),
        "open-data": (data_r, (everything - data_r) | singles),
        "open-class": (class_r, everything - class_r),
    }[scenario]
    assert (old_idx, new_idx) == expect
    assert summary["overlap"]["images"] == len(old_idx & new_idx)


def test_split_bad_source(tmp_path, capsys):
    src, _, _ = make_source(tmp_path)
    pq.write_table(pa.table({"image": pa.array([b"x"]), "label": [1]}), src / "part-00001.parquet")
    code = main(["data", "split", "--src", str(src), "--scenario", "open-class", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "part-00001.parquet" in err and "index" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["data", "split", "--src", str(empty), "--scenario", "open-class", "--out", str(tmp_path / "o")])
    assert code == 2 and "manifest.json: not found" in capsys.readouterr().err


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path):
    """A .partial folder whose process is gone is removed (and said so); a live one is kept."""
    import socket
    import subprocess
    import sys

    from unibct_ray.data.shards import StagedDir

    host = socket.gethostname().replace(".", "_")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free: the owner of this folder is dead
    dead = tmp_path / f".out.{host}-{proc.pid}.deadbeef.partial"
    live = tmp_path / f".out.{host}-{os.getpid()}.cafef00d.partial"
    for d in (dead, live):
        d.mkdir()
        (d / "part-00000.parquet").write_bytes(b"x" * 1000)
    said: list[str] = []
    with StagedDir(tmp_path / "out", log=said.append) as stage:
        (stage.path / "f").write_text("1")
        stage.commit()
    assert not dead.exists() and live.exists()
    assert len(said) == 1 and str(dead) in said[0] and "killed" in said[0]
    assert (tmp_path / "out" / "f").read_text() == "1"


def test_a_full_disk_mid_split_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    """ENOSPC at the third Parquet write (a shard set half written): one line naming the shard,
    exit 2, the previous output byte- and mtime-identical, no temporary file or folder left; the
    next run writes the same shards as before."""
    import errno

    src, _, _ = make_source(tmp_path)
    out = tmp_path / "out"
    argv = ["data", "split", "--src", str(src), "--scenario", "open-class", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    real = pq.ParquetWriter.write_table
    calls = []

    def full_disk(self, table, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, table, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 3 and len(err) == 1, err
    assert "No space left on device" in err[0] and ".parquet" in err[0] and "not kept" in err[0], err
    after = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .partial folder, no .tmp shard
    monkeypatch.undo()

    assert main([*argv, "--overwrite"]) == 0
    again = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.suffix == ".parquet"}
    assert again == {k: b for k, (b, _) in before.items() if k.suffix == ".parquet"} and len(again) >= 3
