"""IJB-C 1:1 verification: template-pair scores, the ROC and TAR@FAR (ARCHITECTURE §6).

- Score of a pair (t1, t2) = <T_enrol[t1], T_verif[t2]>, both L2-normalised templates. In a
  self test both matrices come from one model; in the cross test the enrolment side
  (column 0) is the OLD model and the verification side (column 1) the NEW one.
- ROC = ``sklearn.metrics.roc_curve(labels, scores)`` with its defaults (threshold at +inf
  first, ``drop_intermediate=True``). :func:`roc_curve` reproduces that output exactly
  (same fpr/tpr/thresholds arrays; tested against sklearn, ties and sample weights
  included) in O(m) after one ``np.sort``: ~0.5 s instead of sklearn's ~10 s on the
  15.7M IJB-C pairs here (its stable argsort and input checks), which would otherwise be
  most of a report's time. ``backend="sklearn"`` calls sklearn itself.
- TAR@FAR f = TPR at the ROC point whose FPR is nearest to f; among equally near points the
  highest TPR. (insightface takes the lowest index on ties, i.e. the lowest TPR: on a
  vertical ROC segment the two differ.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from unibct_ray.metrics.templates import template_rows

__all__ = [
    "FARS",
    "rate_key",
    "RocCurve",
    "VerificationResult",
    "PairIndex",
    "pair_scores",
    "roc_curve",
    "tar_from_roc",
    "tar_at_far",
    "verify",
    "SortedPairs",
]

#: FARs of the report, in its key order.
FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Score-matrix elements per GEMM block in pair_scores (float32: 128 MiB).
_BLOCK_ELEMS = 1 << 25
# Use the blocked matrix product when |enrol| x |verif| <= this x number of pairs: a GEMM
# entry costs ~d flops at ~30 GFLOP/s, a gathered pair ~2d bytes of random reads, so the
# product wins until the pairs cover less than ~1/16 of the template grid.
_DENSE_FACTOR = 16


def rate_key(rate: float) -> str:
    """Report key of a FAR/FPIR: 1e-4 -> "1e-4", 0.05 -> "5e-2", 1.5e-3 -> "1.5e-3"."""
    return np.format_float_scientific(float(rate), trim="-", exp_digits=1)


@dataclass(frozen=True, eq=False)
class RocCurve:
    """ROC points in sklearn ``roc_curve`` order (FPR and TPR non-decreasing).

    Attributes:
        fpr, tpr: float64 [p]; NaN throughout when there are no impostor (resp. genuine) pairs.
        thresholds: float64 [p], decreasing, thresholds[0] = +inf.
        n_genuine, n_impostor: (weighted) pair counts behind the rates.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_genuine: float
    n_impostor: float


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """TAR at each FAR (keys from :func:`rate_key`), the ROC, and notes on undefined values."""

    tar: dict[str, float]
    roc: RocCurve
    notes: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- pair scores


@dataclass(frozen=True, eq=False)
class PairIndex:
    """Pairs resolved to template rows once (the same for self_old, self_new and cross).

    Attributes:
        enrol_rows: int64 [u1] ascending rows of ``template_ids`` used in column 0.
        verif_rows: int64 [u2] ascending rows used in column 1.
        a: int [m] position of each pair's column-0 template in ``enrol_rows``.
        b: int [m] position of each pair's column-1 template in ``verif_rows``.
    """

    enrol_rows: np.ndarray
    verif_rows: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @property
    def n_pairs(self) -> int:
        return int(self.a.size)

    @classmethod
    def build(cls, template_ids: np.ndarray, pairs: np.ndarray) -> PairIndex:
        """Resolve ``pairs`` (int [m, 2] template ids) against sorted ``template_ids`` [t].

        Raises:
            ValueError: a pair names a template without images (message names it).
        """
        p = np.asarray(pairs)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"pairs must be [m, 2] template ids, got shape {p.shape}")
        t = int(np.asarray(template_ids).size)
        parts = []
        for col in (0, 1):
            rows = template_rows(template_ids, p[:, col], f"pairs[:, {col}]")
            used = np.zeros(t, bool)
            used[rows] = True  # O(m) instead of np.unique's sort of 15.7M ids
            uniq = np.flatnonzero(used)
            pos = np.zeros(t, rows.dtype)
            pos[uniq] = np.arange(uniq.size)
            parts.append((uniq, pos[rows]))
        return cls(parts[0][0], parts[1][0], parts[0][1], parts[1][1])


def pair_scores(
    template_ids: np.ndarray,
    feats_enrol: np.ndarray,
    feats_verif: np.ndarray,
    pairs: np.ndarray,
    batch: int = _BLOCK_ELEMS,
    index: PairIndex | None = None,
) -> np.ndarray:
    """Score of every template pair.

    score[i] = <feats_enrol[row(pairs[i, 0])], feats_verif[row(pairs[i, 1])]>

    When the pairs cover a good part of the (enrolment x verification) template grid, as
    in IJB-C (15.7M of 3,531 x 19,593), the grid is computed by float32 matrix products in
    row blocks of at most ``batch`` elements and the pairs are read from it; otherwise
    pairs are gathered and dotted in chunks of ``batch // d`` pairs. Memory is bounded by
    ``batch`` either way.

    Args:
        template_ids: int64 [t] sorted unique ids (rows of both feature matrices).
        feats_enrol: [t, d] templates for column 0 (OLD model in the cross test).
        feats_verif: [t, d] templates for column 1 (NEW model in the cross test).
        pairs: int [m, 2] template ids.
        batch: memory bound in float32 elements per step.
        index: a :class:`PairIndex` of the same pairs, to skip resolving them again.

    Returns:
        float32 [m] scores in pair order.
    """
    fe, fv = np.asarray(feats_enrol), np.asarray(feats_verif)
    t = int(np.asarray(template_ids).size)
    if fe.ndim != 2 or fv.ndim != 2 or fe.shape[0] != t or fv.shape[0] != t:
        raise ValueError(
            f"pair_scores: feature matrices must be [{t}, d] (one row per template id), got "
            f"{fe.shape} and {fv.shape}"
        )
    if fe.shape[1] != fv.shape[1]:
        raise ValueError(
            f"pair_scores: enrolment dim {fe.shape[1]} != verification dim {fv.shape[1]}"
        )
    idx = index if index is not None else PairIndex.build(template_ids, pairs)
    if index is not None and np.asarray(pairs).shape[0] != idx.n_pairs:
        raise ValueError(
            f"pair_scores: index holds {idx.n_pairs} pairs but {np.asarray(pairs).shape[0]} given"
        )
    m, d = idx.n_pairs, fe.shape[1]
    out = np.empty(m, np.float32)
    if m == 0:
        return out
    u1, u2 = idx.enrol_rows.size, idx.verif_rows.size
    batch = max(int(batch), d)
    if u1 * u2 <= _DENSE_FACTOR * m:
        ver = np.ascontiguousarray(fv[idx.verif_rows], np.float32)
        rows_per_block = max(1, batch // u2)
        n_blocks = -(-u1 // rows_per_block)
        if n_blocks == 1:
            grid = np.asarray(fe[idx.enrol_rows], np.float32) @ ver.T
            out[:] = grid[idx.a, idx.b]
            return out
        blk = idx.a // rows_per_block
        # Block ids are small integers: a stable sort of uint16 keys is a radix sort, O(m).
        blk = blk.astype(np.uint16 if n_blocks < (1 << 16) else np.int64)
        order = np.argsort(blk, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(blk, minlength=n_blocks))]
        for j in range(n_blocks):
            sel = order[bounds[j] : bounds[j + 1]]
            if sel.size == 0:
                continue
            r0 = j * rows_per_block
            rows = idx.enrol_rows[r0 : r0 + rows_per_block]
            grid = np.asarray(fe[rows], np.float32) @ ver.T
            out[sel] = grid[idx.a[sel] - r0, idx.b[sel]]
        return out
    step = max(1, batch // d)
    r_e, r_v = idx.enrol_rows[idx.a], idx.verif_rows[idx.b]
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        x = np.asarray(fe[r_e[lo:hi]], np.float32)
        y = np.asarray(fv[r_v[lo:hi]], np.float32)
        out[lo:hi] = np.einsum("ij,ij->i", x, y)
    return out


# --------------------------------------------------------------------------- ROC


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}"
        )
    if s.size and not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"scores[{bad}] = {s[bad]} is not finite")
    if y.dtype != bool:
        # Integers: two cheap reductions instead of a set test on 15.7M labels.
        if np.issubdtype(y.dtype, np.integer):
            invalid = bool(y.size) and (y.min() < 0 or y.max() > 1)
        else:
            invalid = not np.isin(y, (0, 1)).all()
        if invalid:
            bad = int(np.flatnonzero(~np.isin(y, (0, 1)))[0])
            raise ValueError(f"labels[{bad}] = {y[bad]} is not 0 (impostor) or 1 (genuine)")
        y = y.astype(bool)
    return s, y


def _finish_roc(
    fps: np.ndarray,
    tps: np.ndarray,
    thresholds: np.ndarray,
    n_impostor: float | None = None,
    n_genuine: float | None = None,
    truncated: bool = False,
    drop_intermediate: bool = True,
) -> RocCurve:
    """sklearn's tail of ``roc_curve``: drop collinear points, prepend (0, 0, +inf), divide.

    ``fps``/``tps`` are float64 cumulative counts per distinct threshold (decreasing).
    ``n_impostor``/``n_genuine`` default to the last counts; ``truncated`` means the
    arrays are a prefix of the full curve: the last point's keep/drop decision needs its
    successor, so it is removed. ``drop_intermediate=False``: the caller already dropped.
    """
    n_imp = float(fps[-1] if fps.size else 0.0) if n_impostor is None else float(n_impostor)
    n_gen = float(tps[-1] if tps.size else 0.0) if n_genuine is None else float(n_genuine)
    if fps.size > 2 and drop_intermediate:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    else:
        keep = np.ones(fps.size, bool)
    if truncated and fps.size > 1:
        # A point's fate depends on its successor: the prefix's last point is undecided,
        # and with <= 2 points sklearn's rule (applied to the longer full curve) is unknown.
        if fps.size <= 2:
            keep[1:] = False
        keep[-1] = False
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    thr = np.r_[np.inf, thresholds.astype(np.float64)]
    fpr = fps / n_imp if n_imp > 0 else np.full(fps.shape, np.nan)
    tpr = tps / n_gen if n_gen > 0 else np.full(tps.shape, np.nan)
    return RocCurve(fpr, tpr, thr, n_gen, n_imp)


def _lookup(keys: np.ndarray, values: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """values[j] where keys[j] == ix (keys sorted unique), 0 where ix is not a key."""
    at = np.minimum(np.searchsorted(keys, ix), keys.size - 1)
    return np.where(keys[at] == ix, values[at], 0)


def roc_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    backend: Literal["fast", "sklearn"] = "fast",
    max_fpr: float | None = None,
) -> RocCurve:
    """ROC of ``sklearn.metrics.roc_curve(labels, scores)`` with its defaults.

    ``"fast"`` gives the same arrays: sklearn sorts the scores, merges equal scores into
    one threshold and takes cumulative genuine/impostor counts at each; the per-threshold
    counts do not depend on the order inside a tie, so a plain ``np.sort`` of the scores and
    a ``searchsorted`` over the few genuine scores replace its stable argsort.

    ``max_fpr`` (fast backend): only the head of that curve, every point with FPR up to
    past ``2 * max_fpr``, from the top ~``2 * max_fpr`` of the scores. TAR at any FAR
    ``f <= max_fpr`` is the same as on the whole curve: the point (0, 0) is at distance
    ``f``, so the nearest points have FPR <= 2 f. (The head is the whole curve when it
    would not be much smaller.)

    Args:
        scores: [m] finite pair scores; labels: [m] 1 genuine / 0 impostor (or bool).
    """
    s, y = _check_scores_labels(scores, labels)
    if s.size == 0:
        return _finish_roc(np.zeros(0), np.zeros(0), np.zeros(0))
    if backend == "sklearn":
        from sklearn.metrics import roc_curve as sk_roc_curve

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined rates become NaN, noted by callers
            fpr, tpr, thr = sk_roc_curve(y.astype(np.int8), s)
        return RocCurve(fpr, tpr, thr, float(y.sum()), float(y.size - y.sum()))
    if backend != "fast":
        raise ValueError(f"roc_curve: backend must be 'fast' or 'sklearn', got {backend!r}")
    if max_fpr is not None:
        head = _fast_roc_head(s, y, float(max_fpr))
        if head is not None:
            return head
    return _fast_roc(s, y)


def _fast_roc_head(s: np.ndarray, y: np.ndarray, max_fpr: float) -> RocCurve | None:
    """The head of the fast ROC: every point of the full curve with FPR <= 2 * max_fpr.

    The scores at or above a threshold chosen by ``np.partition`` hold more than
    ``2 * max_fpr`` of the impostors; whole tie groups are in (``>=``), so only the last
    point's keep/drop decision (which needs the next group) is unknown and is left out.
    None when a head would not be smaller or does not reach past ``2 * max_fpr`` (a long
    collinear stretch at its end): the caller then builds the whole curve.
    """
    m = s.size
    n_gen = int(np.count_nonzero(y))
    n_imp = m - n_gen
    if n_imp == 0 or n_gen == 0 or not 0 <= max_fpr < 0.25:
        return None
    need = int(np.ceil(2 * max_fpr * n_imp)) + 2  # impostors strictly past 2 * max_fpr, and one more
    k = need + n_gen  # the k highest scores hold >= need impostors
    if 2 * k >= m:
        return None
    t = np.partition(s, m - k)[m - k]
    head = s >= t
    roc = _fast_roc(s[head], y[head], n_impostor=n_imp, n_genuine=n_gen, truncated=True)
    if roc.fpr.size < 2 or not roc.fpr[-1] > 2 * max_fpr:
        return None
    return roc


def _fast_roc(s: np.ndarray, y: np.ndarray, n_impostor: float | None = None,
              n_genuine: float | None = None, truncated: bool = False) -> RocCurve:
    """sklearn's ``roc_curve`` arrays from a sort of the scores (see :func:`roc_curve`).

    ``truncated``: ``s`` are all scores at or above some threshold (whole tie groups) and
    ``n_impostor`` / ``n_genuine`` the totals of the full set; the last point is dropped.
    """
    desc = np.sort(s)[::-1]
    m = desc.size
    new_group = np.empty(m, bool)
    new_group[0] = True
    np.not_equal(desc[1:], desc[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)  # first index of each distinct score
    n_groups = starts.size
    sizes = np.diff(starts, append=m)  # pairs per distinct score
    # Genuine scores are few: find their groups by binary search instead of carrying
    # labels through the sort.
    thr_asc = desc[starts][::-1]
    pos_group = np.sort(n_groups - 1 - np.searchsorted(thr_asc, s[y], side="left"))
    # sklearn's drop_intermediate keeps point p (0 < p < last) iff the second differences
    # of the cumulative counts at p are not both 0, i.e. iff group p+1's (impostor,
    # genuine) counts differ from group p's. Deciding on the counts avoids cumulating all
    # ~14M distinct scores; groups without genuine pairs compare by size alone, and the
    # few next to a genuine group are redone with their genuine counts.
    if n_groups > 2:
        change = sizes[2:] != sizes[1:-1]  # change[p - 1] decides point p
        g_u, g_n = np.unique(pos_group, return_counts=True)
        near = np.unique(np.concatenate([g_u, g_u - 1]))
        near = near[(near >= 1) & (near <= n_groups - 2)]
        if near.size:
            pos_p, pos_n = _lookup(g_u, g_n, near), _lookup(g_u, g_n, near + 1)
            neg_p, neg_n = sizes[near] - pos_p, sizes[near + 1] - pos_n
            change[near - 1] = (neg_p != neg_n) | (pos_p != pos_n)
        kept = np.concatenate(([0], np.flatnonzero(change) + 1, [n_groups - 1]))
    else:
        kept = np.arange(n_groups)
    # Genuine pairs at or above each kept threshold: a search over the few genuine groups.
    tps = np.searchsorted(pos_group, kept, side="right")
    fps = starts[kept] + sizes[kept] - tps
    return _finish_roc(fps.astype(np.float64), tps.astype(np.float64), desc[starts[kept]],
                       n_impostor, n_genuine, truncated, drop_intermediate=False)


def tar_from_roc(roc: RocCurve, fars: Sequence[float] = FARS) -> dict[str, float]:
    """TAR at each FAR: TPR at the point with the nearest FPR, the highest TPR on ties.

    Returns:
        {rate_key(far): tar}; NaN for every FAR when the ROC has no genuine or no impostor
        pairs.
    """
    out: dict[str, float] = {}
    defined = roc.n_genuine > 0 and roc.n_impostor > 0
    for far in fars:
        if not defined:
            out[rate_key(far)] = float("nan")
            continue
        dist = np.abs(roc.fpr - float(far))
        nearest = np.flatnonzero(dist == dist.min())
        out[rate_key(far)] = float(roc.tpr[nearest].max())
    return out


def verify(
    scores: np.ndarray,
    labels: np.ndarray,
    fars: Sequence[float] = FARS,
    backend: Literal["fast", "sklearn"] = "fast",
    head_far: float | None = None,
) -> VerificationResult:
    """ROC and TAR@FAR of one set of pair scores (see the module docstring for the rules).

    ``head_far``: the ROC is kept only up to past ``2 * head_far`` (exact TAR at every FAR
    <= ``head_far``; :func:`roc_curve` ``max_fpr``); None: the whole curve.
    """
    if head_far is not None and fars and max(fars) > head_far:
        raise ValueError(f"verify: FAR {max(fars)} lies beyond head_far={head_far}")
    roc = roc_curve(scores, labels, backend, max_fpr=head_far if backend == "fast" else None)
    notes = []
    if roc.n_genuine == 0:
        notes.append("no genuine pairs: TAR is undefined (NaN)")
    if roc.n_impostor == 0:
        notes.append("no impostor pairs: FAR is undefined, TAR reported as NaN")
    return VerificationResult(tar_from_roc(roc, fars), roc, tuple(notes))


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS
) -> dict[str, float]:
    """{"1e-6": tar, ..., "1e-1": tar}; :func:`verify` also returns the ROC for plotting."""
    return verify(scores, labels, fars).tar


# --------------------------------------------------------------------------- weighted ROC


class SortedPairs:
    """Pair scores sorted once, for many ROCs under different per-cluster pair weights.

    ``roc(counts)`` equals ``sklearn.metrics.roc_curve(labels, scores,
    sample_weight=counts[clusters])`` exactly (pairs of weight 0 removed, equal scores
    merged), in O(m) per call: the bootstrap draws cluster multiplicities and calls it
    once per replicate. ``roc(counts, max_fpr=f)`` returns only the curve's head, which
    is all TAR@FAR needs for FAR <= f (see :meth:`roc`).

    Args:
        scores: [m] finite scores; labels: [m] 0/1; clusters: int [m] cluster index of
            each pair (0 <= c < number of clusters).
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, clusters: np.ndarray) -> None:
        s, y = _check_scores_labels(scores, labels)
        c = np.asarray(clusters, np.int64)
        if c.shape != s.shape:
            raise ValueError(f"clusters must be [{s.size}], got {c.shape}")
        if c.size and c.min() < 0:
            raise ValueError("clusters must be non-negative indices")
        m = s.size
        # Any descending order works: equal scores are merged into one threshold, and the
        # per-threshold sums do not depend on the order inside it (no stable sort needed).
        order = np.argsort(s)[::-1]
        s_sorted = s[order]
        new_group = np.ones(m, bool)
        new_group[1:] = s_sorted[1:] != s_sorted[:-1]
        self.group_start = np.flatnonzero(new_group)
        self.thresholds = s_sorted[self.group_start]
        n_cl = int(c.max()) + 1 if m else 0
        idx_t = np.int32 if n_cl < (1 << 31) else np.int64
        self.cluster_sorted = c[order].astype(idx_t)
        y_sorted = y[order]
        self.neg_sorted = ~y_sorted
        group_of = np.cumsum(new_group) - 1
        # Genuine pairs are few (19.6k of 15.7M): keep their groups and clusters apart.
        self.pos_group = group_of[y_sorted]
        self.pos_cluster = self.cluster_sorted[y_sorted]
        self.n_pos_cluster = np.bincount(c[y], minlength=n_cl).astype(np.float64)
        self.n_neg_cluster = np.bincount(c[~y], minlength=n_cl).astype(np.float64)
        self.n_groups = int(self.group_start.size)
        self.n_pairs = m

    def _first_pair_beyond(self, cnt: np.ndarray, need: float) -> int | None:
        """Index of the first sorted pair where the cumulative impostor weight exceeds
        ``need`` (None if it never does); scans in chunks so only the head is touched."""
        step = max(1 << 18, self.n_pairs // 64)
        cum = 0.0
        for lo in range(0, self.n_pairs, step):
            hi = min(lo + step, self.n_pairs)
            cs = cum + np.cumsum(cnt[self.cluster_sorted[lo:hi]] * self.neg_sorted[lo:hi])
            j = int(np.searchsorted(cs, need, side="right"))
            if j < cs.size:
                return lo + j
            cum = float(cs[-1])
        return None

    def _roc_head(self, cnt: np.ndarray, end_group: int, n_neg: float, n_pos: float) -> RocCurve:
        truncated = end_group < self.n_groups
        end_pair = int(self.group_start[end_group]) if truncated else self.n_pairs
        w = cnt[self.cluster_sorted[:end_pair]]
        tot = np.add.reduceat(w, self.group_start[:end_group])
        sel = self.pos_group < end_group
        pos = np.bincount(self.pos_group[sel], weights=cnt[self.pos_cluster[sel]],
                          minlength=end_group)
        keep = tot > 0  # sklearn drops zero-weight pairs before finding distinct scores
        pos, neg = pos[keep], tot[keep] - pos[keep]
        return _finish_roc(np.cumsum(neg), np.cumsum(pos), self.thresholds[:end_group][keep],
                           n_neg, n_pos, truncated)

    def roc(self, counts: np.ndarray | None = None, max_fpr: float | None = None) -> RocCurve:
        """ROC with pair weight ``counts[cluster]`` (None: every pair weight 1).

        With ``max_fpr`` only the head of the curve is built: every point up to a point
        whose FPR exceeds ``2 * max_fpr``. TAR at any FAR f <= max_fpr is then exact: the
        nearest FPR is within f of f (the point (0, 0) is at distance f), so every point
        at that distance has FPR <= 2 f and lies in the head. Points of the head are the
        same as in the full curve.
        """
        if self.n_groups == 0:
            return _finish_roc(np.zeros(0), np.zeros(0), np.zeros(0))
        cnt = (np.ones(self.n_pos_cluster.size) if counts is None
               else np.asarray(counts, np.float64))
        n_pos = float(cnt @ self.n_pos_cluster)
        n_neg = float(cnt @ self.n_neg_cluster)
        if max_fpr is not None and n_neg > 0 and 2 * max_fpr < 1:
            need = 2 * float(max_fpr) * n_neg
            first = self._first_pair_beyond(cnt, need)
            if first is not None:
                g = int(np.searchsorted(self.group_start, first, side="right")) - 1
                margin = 4
                while g + margin < self.n_groups:
                    head = self._roc_head(cnt, g + margin, n_neg, n_pos)
                    # The last decided point must lie beyond 2 * max_fpr (a dropped
                    # collinear point there would leave the head short: widen it).
                    if head.fpr[-1] > 2 * float(max_fpr) * (1 + 1e-9):
                        return head
                    margin *= 16
        return self._roc_head(cnt, self.n_groups, n_neg, n_pos)
