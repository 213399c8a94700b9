"""kNN backends: brute force vs a full stable sort, FAISS flat == brute force, shard merge."""

from __future__ import annotations

import numpy as np
import pytest

from unibct_ray.metrics import knn as knn_mod
from unibct_ray.metrics.knn import (
    ShardedKNN,
    brute_force_knn,
    faiss_knn,
    knn_description,
    merge_topk,
    recall_at_k,
    topk,
)


def loop_knn(gallery, queries, k):
    """Reference: per query, full stable sort of -scores (ties -> lower index), pad -1."""
    g = gallery.shape[0]
    s_out = np.full((queries.shape[0], k), -np.inf, np.float32)
    i_out = np.full((queries.shape[0], k), -1, np.int64)
    for qi, q in enumerate(queries):
        s = gallery.astype(np.float64) @ q.astype(np.float64)
        order = sorted(range(g), key=lambda j: (-s[j], j))[:k]
        i_out[qi, : len(order)] = order
        s_out[qi, : len(order)] = s[order]
    return s_out, i_out


def tied_data(seed=0, g=40, q=15, d=4):
    # small integer vectors: many exactly equal inner products, computed exactly in float32
    rng = np.random.default_rng(seed)
    gal = rng.integers(-1, 2, (g, d)).astype(np.float32)
    qry = rng.integers(-1, 2, (q, d)).astype(np.float32)
    return gal, qry


@pytest.mark.parametrize("k", [1, 3, 7, 40, 45])
def test_brute_force_matches_loop_with_ties(k):
    gal, qry = tied_data()
    s, i = brute_force_knn(gal, qry, k)
    rs, ri = loop_knn(gal, qry, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    assert s.shape == (15, k) and s.dtype == np.float32 and i.dtype == np.int64


def test_brute_force_chunked(monkeypatch):
    gal, qry = tied_data(1, g=30, q=23)
    ref = brute_force_knn(gal, qry, 5)
    monkeypatch.setattr(knn_mod, "_CHUNK_ELEMS", 31)  # one query per chunk
    got = brute_force_knn(gal, qry, 5)
    np.testing.assert_array_equal(got[1], ref[1])


def test_topk_all_equal_keeps_lowest_indices():
    s, i = topk(np.zeros((2, 9), np.float32), 4)
    np.testing.assert_array_equal(i, [[0, 1, 2, 3]] * 2)


def test_empty_gallery_and_errors():
    s, i = brute_force_knn(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32), 2)
    assert (i == -1).all() and np.isneginf(s).all()
    with pytest.raises(ValueError, match="dim"):
        brute_force_knn(np.ones((3, 4)), np.ones((3, 5)), 1)
    with pytest.raises(ValueError, match="k must be"):
        brute_force_knn(np.ones((3, 4)), np.ones((3, 4)), 0)


@pytest.mark.parametrize("k", [1, 5, 40, 50])
def test_faiss_flat_equals_brute_force(k):
    gal, qry = tied_data(2, g=40, q=30)  # q >= 20 takes FAISS's BLAS path
    fs, fi = faiss_knn("flat")(gal, qry, k)
    bs, bi = brute_force_knn(gal, qry, k)
    np.testing.assert_array_equal(fi, bi)
    np.testing.assert_array_equal(fs, bs)
    rng = np.random.default_rng(0)
    g2 = rng.standard_normal((200, 16)).astype(np.float32)
    q2 = rng.standard_normal((7, 16)).astype(np.float32)  # < 20 queries: sequential path
    fs, fi = faiss_knn("flat", threads=1)(g2, q2, 10)
    bs, bi = brute_force_knn(g2, q2, 10)
    np.testing.assert_array_equal(fi, bi)
    np.testing.assert_allclose(fs, bs, rtol=1e-5, atol=1e-5)


def test_faiss_index_kept_between_searches_equals_brute_force():
    gal, qry = tied_data(2, g=40, q=30)
    knn = faiss_knn("flat")
    gal = np.ascontiguousarray(gal, np.float32)
    index = knn.build(gal)
    for k in (5, 40):  # the same index twice, ties at the boundary included
        fs, fi = knn.search_built(index, gal, qry, k)
        bs, bi = brute_force_knn(gal, qry, k)
        np.testing.assert_array_equal(fi, bi)
        np.testing.assert_array_equal(fs, bs)


def test_faiss_approximate_backends_recall():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 32))
    gal = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 32))
    gal = (gal / np.linalg.norm(gal, axis=1, keepdims=True)).astype(np.float32)
    qry = gal[:100] + 0.01
    exact = brute_force_knn(gal, qry, 10)[1]
    for backend in (faiss_knn("ivf", nlist=16, nprobe=16), faiss_knn("hnsw", M=16)):
        s, i = backend(gal, qry, 10)
        assert s.shape == (100, 10) and i.shape == (100, 10)
        assert recall_at_k(i, exact) > 0.9, knn_description(backend)
        assert (np.diff(s, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="index must be"):
        faiss_knn("lsh")


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
def test_shards_merged_equal_one_index(n_shards):
    gal, qry = tied_data(3, g=25, q=12)
    ref = brute_force_knn(gal, qry, 6)
    got = ShardedKNN(brute_force_knn, n_shards)(gal, qry, 6)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])
    flat = ShardedKNN(faiss_knn("flat"), n_shards)(gal, qry, 6)
    np.testing.assert_array_equal(flat[1], ref[1])


def test_merge_topk_explicit_offsets_and_padding():
    # shard A rows 0..1, shard B rows 2..4; equal scores across shards -> lower global index
    a = (np.array([[0.5, 0.2]], np.float32), np.array([[1, 0]]))
    b = (np.array([[0.5, 0.5, -np.inf]], np.float32), np.array([[0, 2, -1]]))
    s, i = merge_topk([a, b], 4, offsets=[0, 2])
    np.testing.assert_array_equal(i, [[1, 2, 4, 0]])
    np.testing.assert_allclose(s, [[0.5, 0.5, 0.5, 0.2]])
    s, i = merge_topk([a], 4)
    np.testing.assert_array_equal(i, [[1, 0, -1, -1]])
    with pytest.raises(ValueError, match="offsets"):
        merge_topk([a, b], 2, offsets=[0])


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, -1]])
    assert recall_at_k(np.array([[2, 1, 9], [4, 3, 8]]), exact) == pytest.approx(4 / 5)
    assert recall_at_k(exact, exact) == 1.0
    assert knn_description(brute_force_knn).startswith("brute_force")


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_faiss_use_gpu_says_where_it_searched(index):
    """use_gpu moves flat/ivf to the GPU only where faiss can; hnsw never (no GPU index), and
    the description names the device. Exact search agrees with the loop either way."""
    from unibct_ray.metrics.knn import faiss_gpu_available

    rng = np.random.default_rng(4)
    gal, qry = _unit(rng, 300, 16), _unit(rng, 40, 16)
    knn = faiss_knn(index, nlist=8, nprobe=8, use_gpu=True)
    assert knn.on_gpu() == (index != "hnsw" and faiss_gpu_available())
    desc = knn_description(knn)
    if index == "hnsw":
        assert "on CPU: FAISS has no GPU HNSW index" in desc
    else:
        assert desc.endswith("on GPU" if faiss_gpu_available() else "on CPU: faiss has no GPU support or sees no GPU")
    assert "GPU" not in knn_description(faiss_knn(index))
    s, i = knn(gal, qry, 5)
    ref_s, ref_i = loop_knn(gal, qry, 5)
    if index == "flat":
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
    else:
        assert recall_at_k(i, ref_i) > 0.9
