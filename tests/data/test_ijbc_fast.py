"""The columnar IJB-C meta reader and the parsed-meta cache, against the strict parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.bench.eval import synthetic_ijbc, write_ijbc_folder
from unibct_ray.data import ijbc
from unibct_ray.errors import DataFormatError

META_ARRAYS = ("templates", "medias", "landmarks", "scores", "pairs", "pair_labels")


def assert_same_meta(a: ijbc.IJBCMeta, b: ijbc.IJBCMeta) -> None:
    assert a.image_names == b.image_names
    for k in META_ARRAYS:
        x, y = getattr(a, k), getattr(b, k)
        # pairs read from the cache are int32 (parsed: int64); every other dtype is the same
        same_type = x.dtype == y.dtype or (k == "pairs" and x.dtype.kind == y.dtype.kind == "i")
        assert same_type and x.shape == y.shape and np.array_equal(x, y), k
    for g in ("gallery1", "gallery2", "probes"):
        for k in ("templates", "subjects"):
            x, y = getattr(getattr(a, g), k), getattr(getattr(b, g), k)
            assert x.dtype == y.dtype and np.array_equal(x, y), (g, k)


def strict(root: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> ijbc.IJBCMeta:
    """The reference: the same folder through the strict (pre-existing) parser only."""
    with monkeypatch.context() as m:
        m.setattr(ijbc, "_arrow_read", lambda *a, **k: None)
        return ijbc.read_ijbc_meta(root, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, ijbc.IJBCMeta]:
    """A ~4.7k-image IJB-C meta folder written from generated meta (x0.01 of the real sizes)."""
    meta, _, _, _ = synthetic_ijbc(0.01, seed=3, dim=4)
    root = write_ijbc_folder(meta, tmp_path_factory.mktemp("fast") / "root", seed=3)
    return root, meta


def test_fast_reader_matches_strict_parser_and_generated_meta(folder, monkeypatch):
    root, generated = folder
    used = []
    real = ijbc._arrow_read

    def spy(*a, **k):
        t = real(*a, **k)
        used.append(t is not None)
        return t

    monkeypatch.setattr(ijbc, "_arrow_read", spy)
    fast = ijbc.read_ijbc_meta(root)
    monkeypatch.undo()
    assert used == [True] * 6, "every file went through the columnar reader"
    assert_same_meta(fast, strict(root, monkeypatch))
    # and against the arrays the folder was written from
    assert np.array_equal(fast.templates, generated.templates)
    assert np.array_equal(fast.pairs, generated.pairs)
    assert np.array_equal(fast.pair_labels, generated.pair_labels)
    assert np.array_equal(fast.scores, generated.scores)
    assert np.array_equal(fast.probes.subjects, generated.probes.subjects)


def _write_variant(root: Path, tmp: Path, edit) -> Path:
    new = tmp / "variant"
    (new / "IJBC" / "meta").mkdir(parents=True)
    for p in (root / "IJBC" / "meta").iterdir():
        (new / "IJBC" / "meta" / p.name).write_bytes(edit(p.name, p.read_bytes()))
    return new


@pytest.mark.parametrize("edit", [
    lambda name, b: b.replace(b" ", b"\t") if name.endswith(".txt") else b,  # tabs
    lambda name, b: b.replace(b" ", b"  ", 50) if name.endswith(".txt") else b,  # runs of spaces
    lambda name, b: b + b"\n\n" if name.endswith(".txt") else b,  # trailing blank lines
    lambda name, b: b.replace(b"\n", b"\r\n"),  # CRLF
], ids=["tabs", "double-spaces", "trailing-blank-lines", "crlf"])
def test_irregular_but_valid_files_read_the_same(folder, tmp_path, monkeypatch, edit):
    root, _ = folder
    variant = _write_variant(root, tmp_path, edit)
    assert_same_meta(ijbc.read_ijbc_meta(variant), strict(root, monkeypatch))


def test_a_line_the_columnar_reader_would_misread_gets_the_strict_error(tmp_path):
    # " 5 6": one space-delimited empty name plus two numbers for a 3-column reader; the
    # strict parser sees two fields.
    meta = tmp_path / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (meta / ijbc.TID_MID_FILE).write_text("a.jpg 1 2\n 1 2\n")
    with pytest.raises(DataFormatError) as exc:
        ijbc.read_tid_mid(meta / ijbc.TID_MID_FILE)
    assert str(exc.value) == (f"{meta / ijbc.TID_MID_FILE}, line 2: expected 3 fields "
                              "('img_name template_id media_id'), found 2")


def test_bad_label_error_names_the_line(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("1 2 0\n1 3 1\n2 3 2\n")
    with pytest.raises(DataFormatError, match=r"pairs.txt, line 3: label 2 is not 0 \(impostor\) or 1"):
        ijbc.read_pair_label(p)
    p.write_text("1 2 0\n1 3 -1\n")
    with pytest.raises(DataFormatError, match=r"pairs.txt, line 2: label -1 is not 0"):
        ijbc.read_pair_label(p)


# --------------------------------------------------------------------------- cache


def _copy(root: Path, tmp: Path) -> Path:
    return _write_variant(root, tmp, lambda name, b: b)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = ijbc._parse_ijbc_meta

    def parse(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ijbc, "_parse_ijbc_meta", parse)
    return calls


def test_cache_hit_on_second_read(folder, tmp_path, monkeypatch):
    root = _copy(folder[0], tmp_path)
    cache = tmp_path / "cache"
    calls = _counting(monkeypatch)
    first = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert len(calls) == 1 and len(list(cache.glob("ijbc-meta-*.npz"))) == 1
    second = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert len(calls) == 1, "second read came from the cache"
    assert second.root == first.root
    assert_same_meta(second, strict(root, monkeypatch))


def _invalidations():
    def size(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(b"%s %s 0\n" % tuple(p.read_bytes().split(b"\n")[0].split()[:2]))

    def mtime(p: Path) -> None:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    def head(p: Path) -> None:
        # Same size, same mtime, one label flipped in the first line.
        st = p.stat()
        b = bytearray(p.read_bytes())
        nl = b.index(b"\n")
        b[nl - 1] = ord("1") if b[nl - 1] == ord("0") else ord("0")
        p.write_bytes(bytes(b))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))

    return {"size": size, "mtime": mtime, "head": head}


@pytest.mark.parametrize("change", ["size", "mtime", "head"])
def test_cache_invalidated_when_a_file_changes(folder, tmp_path, monkeypatch, change):
    root = _copy(folder[0], tmp_path)
    cache = tmp_path / "cache"
    before = ijbc.read_ijbc_meta(root, cache_dir=cache)
    pair_file = root / "IJBC" / "meta" / ijbc.PAIR_LABEL_FILE
    _invalidations()[change](pair_file)
    calls = _counting(monkeypatch)
    after = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert len(calls) == 1, "the changed folder was parsed again"
    monkeypatch.undo()
    assert_same_meta(after, strict(root, monkeypatch))
    if change == "size":
        assert after.n_pairs == before.n_pairs + 1
    if change == "head":
        assert after.pair_labels[0] != before.pair_labels[0]


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "not-a-zip", "wrong-arrays"])
def test_corrupt_cache_is_rebuilt_not_trusted(folder, tmp_path, monkeypatch, damage):
    root = _copy(folder[0], tmp_path)
    cache = tmp_path / "cache"
    ijbc.read_ijbc_meta(root, cache_dir=cache)
    (path,) = cache.glob("ijbc-meta-*.npz")
    data = bytearray(path.read_bytes())
    if damage == "flip-bytes":  # inside the array data: caught by the zip CRC
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x55
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "not-a-zip":
        path.write_bytes(b"\x80\x04garbage" * 100)
    else:  # a well-formed npz with other contents
        with open(path, "wb") as f:
            np.savez(f, names=np.zeros(3, np.uint8), templates=np.arange(5))
    calls = _counting(monkeypatch)
    got = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert len(calls) == 1, "the damaged cache was not used"
    ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert len(calls) == 1, "the rebuilt cache is used"
    monkeypatch.undo()
    assert_same_meta(got, strict(root, monkeypatch))


def test_cached_pairs_are_int32_and_read_only(folder, tmp_path):
    root = _copy(folder[0], tmp_path)
    cache = tmp_path / "cache"
    parsed = ijbc.read_ijbc_meta(root, cache_dir=cache)
    cached = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert parsed.pairs.dtype == np.int64 and cached.pairs.dtype == np.int32
    np.testing.assert_array_equal(cached.pairs, parsed.pairs)
    with pytest.raises(ValueError, match="read-only"):
        cached.pairs[0, 0] = 1  # the arrays lie on a read-only map of the cache file


def test_mapped_npz_reads_what_np_load_reads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((7, 5, 2)).astype(np.float32),
        "fortran": np.asfortranarray(rng.integers(0, 9, (4, 3))),
        "empty": np.zeros((0, 2), np.int32),
        "scalar": np.array(3.5),
        "bytes": np.frombuffer("a\nb\u00e9".encode(), np.uint8),
        "i8": np.array([-1, 0, 1], np.int8),
    }
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    got = ijbc._mapped_npz(path)
    with np.load(path) as z:
        assert sorted(got) == sorted(z.files)
        for k in z.files:
            assert got[k].dtype == z[k].dtype and got[k].shape == z[k].shape, k
            np.testing.assert_array_equal(got[k], z[k])


def test_mapped_npz_refuses_compressed_and_object_members(tmp_path):
    comp = tmp_path / "c.npz"
    np.savez_compressed(comp, a=np.arange(10))
    with pytest.raises(ValueError, match="stored"):
        ijbc._mapped_npz(comp)
    obj = tmp_path / "o.npz"
    np.savez(obj, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="object"):
        ijbc._mapped_npz(obj)


def test_cache_never_unpickles(folder, tmp_path, monkeypatch):
    root = _copy(folder[0], tmp_path)
    cache = tmp_path / "cache"
    ijbc.read_ijbc_meta(root, cache_dir=cache)
    (path,) = cache.glob("ijbc-meta-*.npz")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        np.savez(f, names=np.array([Evil()], dtype=object))
    got = ijbc.read_ijbc_meta(root, cache_dir=cache)
    assert not marker.exists()
    assert_same_meta(got, strict(root, monkeypatch))


def test_bad_meta_error_is_the_same_with_a_cache_dir(tmp_path):
    root = tmp_path / "r"
    (root / "IJBC" / "meta").mkdir(parents=True)
    meta, _, _, _ = synthetic_ijbc(0.01, seed=1, dim=4)
    write_ijbc_folder(meta, root)
    p = root / "IJBC" / "meta" / ijbc.PAIR_LABEL_FILE
    lines = p.read_bytes().split(b"\n")
    lines[7] = b"1 2 x"
    p.write_bytes(b"\n".join(lines))
    msgs = []
    for kw in ({}, {"cache_dir": tmp_path / "cache"}):
        with pytest.raises(DataFormatError) as exc:
            ijbc.read_ijbc_meta(root, **kw)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1] == f"{p}, line 8: field 3 'x' is not an integer (expected 't1 t2 label')"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
