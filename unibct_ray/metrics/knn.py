"""k-nearest-neighbour backends behind one callable type (inner product, largest first).

A backend is ``KNN = Callable[[gallery [g, d], queries [q, d], k], (scores [q, k],
indices [q, k])]``: for unit vectors the inner product is the cosine similarity. Every
backend returns exactly ``k`` columns, rows sorted by score descending and, among equal
scores, by gallery index ascending. Columns a backend could not fill (``k > g``, or an
approximate index that found fewer neighbours) hold index ``-1`` and score ``-inf``.

- :func:`brute_force_knn`: numpy, exact, chunked over queries (the reference).
- :func:`faiss_knn`: FAISS ``flat`` (exact, same results as brute force), ``ivf`` or ``hnsw``;
  with ``use_gpu`` flat and ivf search on GPU 0 when faiss was built with GPU support and a
  GPU is visible (``faiss.get_num_gpus() > 0``), else on the CPU. FAISS has no GPU HNSW
  index: hnsw always searches on the CPU.
- :func:`merge_topk` / :class:`ShardedKNN`: exact merge of per-shard top-k lists, which is
  what the Ray actors holding gallery shards return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

__all__ = [
    "KNN",
    "topk",
    "brute_force_knn",
    "faiss_knn",
    "FaissKNN",
    "merge_topk",
    "ShardedKNN",
    "recall_at_k",
    "knn_description",
    "faiss_gpu_available",
]

KNN = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]

# Score-matrix elements per query chunk of the brute-force search (float32: 128 MiB).
_CHUNK_ELEMS = 1 << 25


def _check_knn_args(gallery: np.ndarray, queries: np.ndarray, k: int) -> None:
    if gallery.ndim != 2 or queries.ndim != 2:
        raise ValueError(
            f"kNN: gallery and queries must be 2-D [n, d], got shapes {gallery.shape} and "
            f"{queries.shape}"
        )
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(
            f"kNN: gallery dim {gallery.shape[1]} != query dim {queries.shape[1]}"
        )
    if int(k) < 1:
        raise ValueError(f"kNN: k must be >= 1, got {k}")


def _empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)


def _sort_rows(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score desc, index asc). Index -1 sorts by its score (-inf for
    "no result", so last; a wrapper may use -1 with a real score, e.g. a distractor hit)
    and after real indices of an equal score."""
    key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every row of a score matrix.

    Args:
        scores: [q, g] similarities (finite).
        k: neighbours per row (>= 1); columns beyond ``g`` are padded (-inf, -1).

    Returns:
        (scores [q, k] descending, indices int64 [q, k]); equal scores are ordered by lower
        index, and a tie at the k-th place keeps the lowest indices (a full stable sort
        would give the same answer; this is O(q g) instead of O(q g log g)).
    """
    q, g = scores.shape
    kk = min(int(k), g)
    if q == 0 or g == 0:
        return _empty_result(q, int(k))
    if kk == g:
        idx = np.argsort(-scores, axis=1, kind="stable")
    else:
        kth = np.partition(scores, g - kk, axis=1)[:, g - kk]  # k-th largest value per row
        greater = scores > kth[:, None]
        equal = scores == kth[:, None]
        need = kk - greater.sum(1)  # how many of the equal values each row still takes
        sel = greater | equal
        surplus = np.flatnonzero(equal.sum(1) > need)
        if surplus.size:
            # Boundary ties: keep the lowest indices among the equal values only.
            eq_rank = np.cumsum(equal[surplus], axis=1)
            sel[surplus] = greater[surplus] | (equal[surplus] & (eq_rank <= need[surplus, None]))
        idx = np.nonzero(sel)[1].reshape(q, kk)  # row-major: indices ascending per row
        vals = np.take_along_axis(scores, idx, 1)
        # Stable sort keeps ascending index order among equal scores.
        order = np.argsort(-vals, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, 1)
    vals = np.take_along_axis(scores, idx, 1).astype(np.float32, copy=False)
    idx = idx.astype(np.int64, copy=False)
    if kk < k:
        pad_s, pad_i = _empty_result(q, int(k) - kk)
        vals, idx = np.hstack([vals, pad_s]), np.hstack([idx, pad_i])
    return vals, idx


def brute_force_knn(
    gallery: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN in numpy (float32 matmul), chunked over queries.

    Args:
        gallery: [g, d]; queries: [q, d]; k: neighbours per query.

    Returns:
        (scores float32 [q, k] descending, indices int64 [q, k]); see :func:`topk` for ties.
    """
    _check_knn_args(gallery, queries, k)
    q, g = queries.shape[0], gallery.shape[0]
    if g == 0 or q == 0:
        return _empty_result(q, int(k))
    gal = np.asarray(gallery, np.float32)
    step = max(1, _CHUNK_ELEMS // max(g, 1))
    out_s = np.empty((q, int(k)), np.float32)
    out_i = np.empty((q, int(k)), np.int64)
    for lo in range(0, q, step):
        hi = min(lo + step, q)
        s, i = topk(np.asarray(queries[lo:hi], np.float32) @ gal.T, k)
        out_s[lo:hi], out_i[lo:hi] = s, i
    return out_s, out_i


def faiss_gpu_available() -> bool:
    """faiss was built with GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@lru_cache(maxsize=1)
def _gpu_resources() -> object:
    """One ``StandardGpuResources`` per process: it reserves scratch memory on the device, which
    every GPU index of the process can share; creating one per search would repeat that."""
    import faiss

    return faiss.StandardGpuResources()


@dataclass(frozen=True)
class FaissKNN:
    """A FAISS-backed :data:`KNN`; build it with :func:`faiss_knn`.

    The index is built on the gallery at each call (galleries here are a few thousand
    templates, so building costs far less than searching the probes).
    ``use_gpu``: flat and ivf indexes move to GPU 0 when :func:`faiss_gpu_available`; hnsw
    has no GPU index in FAISS and stays on the CPU.
    """

    index: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = 1024
    nprobe: int = 32
    M: int = 32
    ef_search: int = 128
    threads: int | None = None
    use_gpu: bool = False

    def on_gpu(self) -> bool:
        """Whether this backend searches on the GPU in this process."""
        return self.use_gpu and self.index != "hnsw" and faiss_gpu_available()

    def device_note(self) -> str:
        """Where the search runs, for the report (empty for a CPU backend nobody asked to move)."""
        if not self.use_gpu:
            return ""
        if self.index == "hnsw":
            return "on CPU: FAISS has no GPU HNSW index"
        return "on GPU" if faiss_gpu_available() else "on CPU: faiss has no GPU support or sees no GPU"

    @property
    def description(self) -> str:
        if self.index == "flat":
            d = "faiss IndexFlatIP (exact)"
        elif self.index == "ivf":
            d = f"faiss IndexIVFFlat IP (nlist={self.nlist}, nprobe={self.nprobe}, approximate)"
        else:
            d = f"faiss IndexHNSWFlat IP (M={self.M}, efSearch={self.ef_search}, approximate)"
        note = self.device_note()
        return f"{d}, {note}" if note else d

    def _build(self, faiss: object, gal: np.ndarray) -> object:
        g, d = gal.shape
        if self.index == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.index == "ivf":
            # FAISS needs >= nlist training points; fewer lists than that would be empty.
            nlist = max(1, min(self.nlist, g))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(gal)
            index.nprobe = min(self.nprobe, nlist)  # the wrapper keeps quantizer alive
        else:
            index = faiss.IndexHNSWFlat(d, self.M, faiss.METRIC_INNER_PRODUCT)
        index.add(gal)
        if self.on_gpu():
            # Built (and for ivf trained) on the CPU, then copied: the copy keeps nprobe. The
            # GPU index refers to the per-process resources, which outlive it.
            index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
            if self.index == "ivf":
                index.nprobe = min(self.nprobe, max(1, min(self.nlist, g)))
        return index

    def build(self, gallery: np.ndarray) -> object:
        """This backend's FAISS index over ``gallery`` (float32, C order), for ``search_built``."""
        import faiss

        return self._build(faiss, gallery)

    def __call__(
        self, gallery: np.ndarray, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss  # imported lazily: only this backend needs it

        _check_knn_args(gallery, queries, k)
        q, g = queries.shape[0], gallery.shape[0]
        if g == 0 or q == 0:
            return _empty_result(q, int(k))
        gal = np.ascontiguousarray(gallery, np.float32)
        old_threads = faiss.omp_get_max_threads()
        if self.threads is not None:
            faiss.omp_set_num_threads(int(self.threads))
        try:
            return self.search_built(self._build(faiss, gal), gal, queries, k)
        finally:
            if self.threads is not None:
                faiss.omp_set_num_threads(old_threads)

    def search_built(self, index: object, gallery: np.ndarray, queries: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Search an index ``build`` made on ``gallery`` (float32, C order) - a caller that
        keeps the index between searches; same result as calling this object."""
        q, g = queries.shape[0], gallery.shape[0]
        if g == 0 or q == 0:
            return _empty_result(q, int(k))
        qry = np.ascontiguousarray(queries, np.float32)
        kk = min(int(k), g)
        if self.index == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, kk)
        # (A GPU flat index returns at most 2048 neighbours; k here is the 1:N depth, <= 100.)
        # One extra neighbour tells whether the k-th place is tied with something
        # outside the list; FAISS does not document which tied item it keeps.
        extra = 1 if (self.index == "flat" and kk < g) else 0
        dist, lab = index.search(qry, kk + extra)
        dist = dist.astype(np.float32, copy=False)
        lab = lab.astype(np.int64, copy=False)
        dist[lab < 0] = -np.inf
        if extra:
            tied = np.flatnonzero(dist[:, kk] == dist[:, kk - 1])
            dist, lab = dist[:, :kk].copy(), lab[:, :kk].copy()
            if tied.size:  # exact numpy answer for the rows with a tie at the boundary
                s, i = topk(qry[tied] @ gallery.T, kk)
                dist[tied], lab[tied] = s, i
        dist, lab = _sort_rows(dist, lab)
        if kk < k:
            pad_s, pad_i = _empty_result(q, int(k) - kk)
            dist, lab = np.hstack([dist, pad_s]), np.hstack([lab, pad_i])
        return dist, lab


def faiss_knn(
    index: Literal["flat", "ivf", "hnsw"] = "flat",
    nlist: int = 1024,
    nprobe: int = 32,
    M: int = 32,
    ef_search: int = 128,
    threads: int | None = None,
    use_gpu: bool = False,
) -> FaissKNN:
    """A FAISS inner-product :data:`KNN`.

    Args:
        index: ``"flat"`` (exact; identical neighbours to :func:`brute_force_knn`, scores
            equal up to float32 rounding), ``"ivf"`` (IndexIVFFlat, ``nlist`` lists of which
            ``nprobe`` are searched; ``nlist`` is capped at the gallery size) or ``"hnsw"``
            (IndexHNSWFlat with ``M`` links, ``ef_search`` >= k).
        threads: OpenMP threads for the call (restored afterwards); None keeps FAISS's.
        use_gpu: search flat / ivf on GPU 0 when faiss has GPU support and sees a GPU.
    """
    if index not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"faiss_knn: index must be 'flat', 'ivf' or 'hnsw', got {index!r}")
    for name, v in (("nlist", nlist), ("nprobe", nprobe), ("M", M), ("ef_search", ef_search)):
        if int(v) < 1:
            raise ValueError(f"faiss_knn: {name} must be >= 1, got {v}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"faiss_knn: threads must be >= 1 or None, got {threads}")
    return FaissKNN(index, int(nlist), int(nprobe), int(M), int(ef_search), threads, bool(use_gpu))


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists into the global top-k.

    Args:
        parts: per shard ``(scores [q, k_s], indices [q, k_s])`` as a :data:`KNN` returns
            them (local indices, -1 for "none").
        k: neighbours to keep.
        offsets: global index of each shard's row 0 (shards in gallery order); None when
            the indices are already global.

    Returns:
        (scores [q, k], global indices [q, k]) equal to one search over the whole gallery,
        ties included: each shard keeps its lowest local indices among equal scores and
        offsets preserve order, so the lowest global indices survive the merge.
    """
    if not parts:
        raise ValueError("merge_topk: no shard results to merge")
    if offsets is not None and len(offsets) != len(parts):
        raise ValueError(f"merge_topk: {len(parts)} shard results but {len(offsets)} offsets")
    q = parts[0][0].shape[0]
    scores, idx = [], []
    for j, (s, i) in enumerate(parts):
        if s.shape != i.shape or s.ndim != 2 or s.shape[0] != q:
            raise ValueError(
                f"merge_topk: shard {j} has scores {s.shape} and indices {i.shape}; expected "
                f"matching [{q}, k_s] arrays"
            )
        i = np.asarray(i, np.int64)
        if offsets is not None:
            i = np.where(i < 0, -1, i + int(offsets[j]))
        scores.append(np.asarray(s, np.float32))
        idx.append(i)
    s_all, i_all = _sort_rows(np.hstack(scores), np.hstack(idx))
    s_all, i_all = s_all[:, : int(k)], i_all[:, : int(k)]
    if s_all.shape[1] < k:
        pad_s, pad_i = _empty_result(q, int(k) - s_all.shape[1])
        s_all, i_all = np.hstack([s_all, pad_s]), np.hstack([i_all, pad_i])
    return s_all, i_all


@dataclass(frozen=True)
class ShardedKNN:
    """Split the gallery into ``n_shards`` contiguous shards, search each with ``knn`` and
    merge: the single-process version of what the gallery-shard actors do."""

    knn: KNN
    n_shards: int

    @property
    def description(self) -> str:
        return f"{knn_description(self.knn)} over {self.n_shards} shards"

    def __call__(
        self, gallery: np.ndarray, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_knn_args(gallery, queries, k)
        if self.n_shards < 1:
            raise ValueError(f"ShardedKNN: n_shards must be >= 1, got {self.n_shards}")
        bounds = np.linspace(0, gallery.shape[0], self.n_shards + 1).astype(int)
        parts = [self.knn(gallery[a:b], queries, k) for a, b in zip(bounds[:-1], bounds[1:])]
        return merge_topk(parts, k, offsets=bounds[:-1].tolist())


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean fraction of the exact top-k neighbours that the approximate search returned.

    Args:
        approx_idx: [q, k] indices from an approximate backend.
        exact_idx: [q, k] indices from an exact backend (-1 entries are not counted).

    Returns:
        Recall in [0, 1]; nan when ``exact_idx`` holds no neighbours.
    """
    a, e = np.asarray(approx_idx), np.asarray(exact_idx)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(
            f"recall_at_k: expected [q, k] index arrays with equal q, got {a.shape} and {e.shape}"
        )
    valid = e >= 0
    if not valid.any():
        return float("nan")
    found = np.zeros(e.shape, bool)
    # k is small (<= a few hundred): a [chunk, k, k] comparison is cheaper than sets.
    step = max(1, (1 << 22) // max(1, e.shape[1] * a.shape[1]))
    for lo in range(0, e.shape[0], step):
        hi = lo + step
        found[lo:hi] = (e[lo:hi, :, None] == a[lo:hi, None, :]).any(-1)
    return float((found & valid).sum() / valid.sum())


def knn_description(knn: KNN) -> str:
    """Human-readable name of a backend for the report's protocol section."""
    if knn is brute_force_knn:
        return "brute_force (numpy, exact)"
    desc = getattr(knn, "description", None)
    if isinstance(desc, str):
        return desc
    return getattr(knn, "__name__", type(knn).__name__)
