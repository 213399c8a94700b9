"""IJB-C 1:N identification: top-k and TPIR@FPIR over the galleries G1 and G2 (ARCHITECTURE §6).

For each gallery separately:

- a probe is *mated* when its subject has a template in the gallery, *non-mated* otherwise;
- a mated probe is a rank-k hit when a template of its subject is among its k nearest
  gallery templates (order: score descending, ties by lower gallery index);
- TPIR@FPIR: the non-mated probes' maximum scores sorted descending give the threshold at
  index ``max(floor(N_nm * FPIR) - 1, 0)``; a mated probe counts when its rank-1 template is
  its own subject's and that score is strictly above the threshold; TPIR = count / mated.

Across galleries: top-k = (hits in G1 + hits in G2) / number of probes; TPIR = mean of the
galleries' TPIRs. Undefined values (an empty gallery, no mated or no non-mated probes, no
probes) are NaN, each with a note saying why; a TPIR mean skips undefined galleries.

Per-probe outcomes (mated, rank, top-1 score) are kept so that the bootstrap recomputes
the metrics under subject weights with the same code (:func:`weighted_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from unibct_ray.metrics.knn import KNN, brute_force_knn
from unibct_ray.metrics.verification import rate_key

__all__ = [
    "KS",
    "FPIRS",
    "CMC_RANKS",
    "metric_keys",
    "TemplateSet",
    "GalleryOutcome",
    "IdentificationResult",
    "identify",
    "outcome_from_scores",
    "identify_galleries",
    "identification_result",
    "weighted_metrics",
]

KS: tuple[int, ...] = (1, 5, 10)
FPIRS: tuple[float, ...] = (1e-2, 1e-1)
#: Ranks of the CMC curve kept for plotting.
CMC_RANKS = 20


def metric_keys(ks: Sequence[int] = KS, fpirs: Sequence[float] = FPIRS) -> list[str]:
    """Result keys: "top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"."""
    return [f"top{k}" for k in ks] + [f"tpir@fpir={rate_key(f)}" for f in fpirs]


@dataclass(frozen=True, eq=False)
class TemplateSet:
    """Templates of one side of the 1:N test.

    Attributes:
        ids: int64 [t] template ids; subjects: int64 [t]; feats: float32 [t, d] normalised.
    """

    ids: np.ndarray
    subjects: np.ndarray
    feats: np.ndarray

    def __post_init__(self) -> None:
        ids, subj, feats = (np.asarray(a) for a in (self.ids, self.subjects, self.feats))
        t = ids.shape[0] if ids.ndim == 1 else -1
        if t < 0 or subj.shape != (t,) or feats.ndim != 2 or feats.shape[0] != t:
            raise ValueError(
                f"TemplateSet: ids {ids.shape}, subjects {subj.shape} and feats {feats.shape} "
                "must be [t], [t] and [t, d]"
            )
        for name, arr in (("ids", ids), ("subjects", subj), ("feats", feats)):
            object.__setattr__(self, name, arr)  # frozen: store the array form once


@dataclass(frozen=True, eq=False)
class GalleryOutcome:
    """Per-probe result of searching one gallery.

    Attributes:
        name: gallery name ("G1", "G2").
        mated: bool [q] probe subject has a template in this gallery.
        rank: int64 [q] 1-based rank of the first template of the probe's subject within
            the top ``max_rank`` (0 when not there, always 0 for non-mated probes).
        top1: float32 [q] best score over the gallery (-inf when the gallery is empty).
        max_rank: ranks searched.
        gallery_size: number of gallery templates.
    """

    name: str
    mated: np.ndarray
    rank: np.ndarray
    top1: np.ndarray
    max_rank: int
    gallery_size: int


@dataclass(frozen=True, eq=False)
class IdentificationResult:
    """Metrics over all galleries.

    Attributes:
        metrics: {"top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"} -> value.
        cmc: float64 [CMC_RANKS] identification rate at ranks 1..K (same denominator as top-k).
        per_gallery: {gallery name: {"tpir@fpir=...": value, "threshold@fpir=...": value,
            "n_mated": int, "n_nonmated": int}}.
        outcomes: the per-gallery :class:`GalleryOutcome`.
        notes: why any value is NaN.
    """

    metrics: dict[str, float]
    cmc: np.ndarray
    per_gallery: dict[str, dict[str, float]]
    outcomes: tuple[GalleryOutcome, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def identify(
    gallery_ids: np.ndarray,
    gallery_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    probe_ids: np.ndarray,
    probe_subjects: np.ndarray,
    probe_feats: np.ndarray,
    knn: KNN = brute_force_knn,
    ks: Sequence[int] = KS,
    fpirs: Sequence[float] = FPIRS,
    max_rank: int = CMC_RANKS,
    name: str = "G",
) -> GalleryOutcome:
    """Search one gallery with every probe.

    Args:
        gallery_ids, gallery_subjects: int [g]; gallery_feats: [g, d] normalised templates.
        probe_ids, probe_subjects: int [q]; probe_feats: [q, d] normalised templates (in
            the cross test from the NEW model, the gallery from the OLD one).
        knn: backend returning the top ``max(max(ks), max_rank)`` neighbours.
        ks: sizes the search with ``max_rank`` (the metrics: :func:`weighted_metrics`).
        fpirs: accepted for a uniform signature; thresholds need only the top-1 scores.
        max_rank: neighbours searched (CMC length).
        name: gallery name used in notes.

    Returns:
        :class:`GalleryOutcome`.
    """
    gal = TemplateSet(gallery_ids, gallery_subjects, gallery_feats)
    prb = TemplateSet(probe_ids, probe_subjects, probe_feats)
    if gal.feats.shape[0] and prb.feats.shape[0] and gal.feats.shape[1] != prb.feats.shape[1]:
        raise ValueError(
            f"identify({name}): gallery dim {gal.feats.shape[1]} != probe dim {prb.feats.shape[1]}"
        )
    q, g = prb.ids.size, gal.ids.size
    k = max(max(ks, default=1), int(max_rank), 1)
    psub = prb.subjects.astype(np.int64)
    mated = np.isin(psub, gal.subjects)
    rank = np.zeros(q, np.int64)
    top1 = np.full(q, -np.inf, np.float32)
    if g and q:
        scores, idx = knn(gal.feats, prb.feats, k)
        if scores.shape != (q, k) or idx.shape != (q, k):
            raise ValueError(
                f"identify({name}): kNN returned {scores.shape}/{idx.shape}, expected [{q}, {k}]"
            )
        gsub = np.where(idx >= 0, gal.subjects[np.clip(idx, 0, None)], np.iinfo(np.int64).min)
        hit = gsub == psub[:, None]
        found = hit.any(1)
        rank[found] = hit[found].argmax(1) + 1  # only mated probes can match
        top1 = scores[:, 0].astype(np.float32)
    return GalleryOutcome(name, mated, rank, top1, k, g)


def outcome_from_scores(
    scores_gq: np.ndarray,
    gallery_subjects: np.ndarray,
    probe_subjects: np.ndarray,
    max_rank: int = CMC_RANKS,
    name: str = "G",
) -> GalleryOutcome:
    """:func:`identify` for a precomputed dense score matrix, without sorting.

    The rank of a probe's first mate in the order (score desc, gallery index asc) is
    1 + #(scores above the best mate score s*) + #(scores equal to s* at a lower index
    than the first mate reaching s*): a few O(g q) passes instead of a top-k selection.
    Same outcome as :func:`identify` with :func:`~unibct_ray.metrics.knn.brute_force_knn`.

    Args:
        scores_gq: [g, q] similarities (gallery-major, as the shared 1:1 grid is laid out).
        gallery_subjects: int [g]; probe_subjects: int [q].
    """
    S = np.asarray(scores_gq)
    gsub = np.asarray(gallery_subjects, np.int64)
    psub = np.asarray(probe_subjects, np.int64)
    g, q = S.shape
    if gsub.shape != (g,) or psub.shape != (q,):
        raise ValueError(
            f"outcome_from_scores({name}): scores {S.shape}, gallery subjects {gsub.shape} and "
            f"probe subjects {psub.shape} do not match"
        )
    mated = np.isin(psub, gsub)
    rank = np.zeros(q, np.int64)
    if g == 0 or q == 0:
        return GalleryOutcome(name, mated, rank, np.full(q, -np.inf, np.float32), max_rank, g)
    top1 = S.max(0).astype(np.float32)
    # A probe's mates are the few gallery rows of its subject: look them up per probe (the
    # k-th mate of every probe at once) instead of masking the [g, q] matrix.
    by_subject = np.argsort(gsub, kind="stable")  # rows of one subject stay ascending
    lo = np.searchsorted(gsub[by_subject], psub, side="left")
    n_mates = np.searchsorted(gsub[by_subject], psub, side="right") - lo
    best = np.full(q, -np.inf, S.dtype)  # best mate score per probe (-inf: none)
    first = np.zeros(q, np.int64)  # lowest gallery row of a mate reaching it
    cols = np.arange(q)
    for k in range(int(n_mates.max())):
        c = cols[n_mates > k]
        rows = by_subject[lo[c] + k]
        v = S[rows, c]
        better = v > best[c]  # rows ascend with k: an equal score keeps the earlier row
        best[c[better]], first[c[better]] = v[better], rows[better]
    above = (S > best[None, :]).sum(0)
    # Non-mates tied with the best mate rank before it when their row is lower. Ties are
    # rare: count them only in the columns where more than the mate reaches the score.
    tied = np.flatnonzero((S == best[None, :]).sum(0) > 1)
    tied_before = np.zeros(q, np.int64)
    if tied.size:
        eq = S[:, tied] == best[None, tied]
        tied_before[tied] = (eq & (np.arange(g)[:, None] < first[None, tied])).sum(0)
    r = 1 + above + tied_before
    ok = mated & (r <= max_rank)
    rank[ok] = r[ok]
    return GalleryOutcome(name, mated, rank, top1, max_rank, g)


def _threshold_index(n_nonmated: np.ndarray, fpir: float) -> np.ndarray:
    """max(floor(N_nm * FPIR) - 1, 0), exactly: FPIR is taken as the decimal it prints as
    (0.1 -> 1/10), so 10 * 0.1 gives 1 and not 0.99999... -> 0."""
    fr = Fraction(repr(float(fpir)))
    n = np.asarray(n_nonmated, np.int64)
    return np.maximum((n * fr.numerator) // fr.denominator - 1, 0)


def weighted_metrics(
    outcomes: Sequence[GalleryOutcome],
    weights: np.ndarray | None = None,
    ks: Sequence[int] = KS,
    fpirs: Sequence[float] = FPIRS,
    cmc_ranks: int = CMC_RANKS,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, dict[str, np.ndarray]], list[str]]:
    """Top-k, TPIR@FPIR and CMC under integer probe weights, for many weightings at once.

    A weight is a probe's multiplicity (the bootstrap's subject counts); weight 1 for all
    gives the plain metrics. Non-mated scores with multiplicity w occupy w places of the
    sorted list that defines the threshold.

    Args:
        outcomes: one :class:`GalleryOutcome` per gallery (same probes in the same order).
        weights: [r, q] (or [q]) non-negative integer weights; None = all ones, r = 1.

    Returns:
        (metrics {key: float64 [r]}, cmc float64 [r, cmc_ranks], per-gallery
        {name: {key: [r]}}, notes). NaN marks undefined values, explained in the notes.
    """
    if not outcomes:
        raise ValueError("weighted_metrics: no galleries")
    q = outcomes[0].mated.size
    for o in outcomes:
        if o.mated.size != q:
            raise ValueError(
                f"weighted_metrics: gallery {o.name} has {o.mated.size} probes, expected {q}"
            )
    W = np.ones((1, q), np.float64) if weights is None else np.asarray(weights, np.float64)
    if W.ndim == 1:
        W = W[None, :]
    if W.shape[1] != q:
        raise ValueError(f"weighted_metrics: weights must be [r, {q}], got {W.shape}")
    if (W < 0).any():
        raise ValueError("weighted_metrics: weights must be non-negative")
    for f in fpirs:
        if not 0 < float(f) <= 1:
            raise ValueError(f"weighted_metrics: FPIR must be in (0, 1], got {f}")
    r = W.shape[0]
    notes: list[str] = []
    n_probes = W.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        hits = np.zeros((r, cmc_ranks))
        per_gallery: dict[str, dict[str, np.ndarray]] = {}
        tpirs = {f: [] for f in fpirs}
        for o in outcomes:
            stats: dict[str, np.ndarray] = {}
            if o.gallery_size == 0:
                notes.append(f"gallery {o.name} is empty: it has no hits and no TPIR")
            # Hits at rank <= j for j = 1..cmc_ranks, via a rank histogram per weighting.
            ranks = np.where(o.mated & (o.rank >= 1), o.rank, 0)
            cols = np.clip(ranks, 0, cmc_ranks + 1)
            onehot = np.zeros((q, cmc_ranks + 2))
            onehot[np.arange(q), cols] = 1.0
            hist = W @ onehot  # [r, cmc_ranks + 2]: column j = weight hit at rank j
            hits += np.cumsum(hist[:, 1 : cmc_ranks + 1], axis=1)
            n_mated = W @ o.mated.astype(np.float64)
            nm = ~o.mated
            nm_scores = o.top1[nm].astype(np.float64)
            order = np.argsort(-nm_scores, kind="stable")
            nm_sorted = nm_scores[order]
            cum = np.cumsum(W[:, nm][:, order], axis=1)  # [r, n_nm] weighted positions
            n_nm = cum[:, -1] if cum.shape[1] else np.zeros(r)
            correct = o.mated & (o.rank == 1)
            stats["n_mated"] = n_mated
            stats["n_nonmated"] = n_nm
            if not o.mated.any():
                notes.append(f"gallery {o.name}: no mated probes, TPIR undefined (NaN)")
            if not nm.any():
                notes.append(f"gallery {o.name}: no non-mated probes, FPIR threshold undefined")
            for f in fpirs:
                thr = np.full(r, np.nan)
                ok = n_nm > 0
                if ok.any():
                    at = _threshold_index(np.round(n_nm[ok]).astype(np.int64), f)
                    pos = (cum[ok] > at[:, None]).argmax(1)
                    thr[ok] = nm_sorted[pos]
                above = o.top1.astype(np.float64)[None, :] > thr[:, None]  # NaN -> False
                counted = ((correct[None, :] & above) * W).sum(1)
                tpir = np.where(ok & (n_mated > 0), counted / n_mated, np.nan)
                stats[f"tpir@fpir={rate_key(f)}"] = tpir
                stats[f"threshold@fpir={rate_key(f)}"] = thr
                tpirs[f].append(tpir)
            per_gallery[o.name] = stats
        cmc = hits / n_probes[:, None]
        metrics: dict[str, np.ndarray] = {}
        for k in ks:
            if k > cmc_ranks:
                raise ValueError(f"weighted_metrics: k={k} exceeds cmc_ranks={cmc_ranks}")
            metrics[f"top{k}"] = cmc[:, k - 1]
        for f in fpirs:
            stack = np.stack(tpirs[f])  # [galleries, r]
            n_def = np.isfinite(stack).sum(0)
            metrics[f"tpir@fpir={rate_key(f)}"] = np.where(
                n_def > 0, np.nansum(stack, 0) / np.maximum(n_def, 1), np.nan
            )
    if q == 0:
        notes.append("no probes: top-k and TPIR undefined (NaN)")
    partly = [
        f for f in fpirs
        if np.isfinite(np.stack(tpirs[f])).any(0).any() and not np.isfinite(np.stack(tpirs[f])).all()
    ]
    if partly:
        notes.append("TPIR is the mean over the galleries where it is defined")
    return metrics, cmc, per_gallery, notes


def identify_galleries(
    galleries: Sequence[TemplateSet],
    probes: TemplateSet,
    knn: KNN | Sequence[KNN] = brute_force_knn,
    ks: Sequence[int] = KS,
    fpirs: Sequence[float] = FPIRS,
    names: Sequence[str] | None = None,
    cmc_ranks: int = CMC_RANKS,
) -> IdentificationResult:
    """The full 1:N test: every probe against each gallery (G1, G2), metrics combined.

    Args:
        galleries: e.g. (G1, G2) templates (OLD model in the cross test).
        probes: probe templates (NEW model in the cross test).
        knn: one backend for all galleries, or one per gallery.
        names: gallery names; default "G1", "G2", ...

    Returns:
        :class:`IdentificationResult` with keys from :func:`metric_keys`.
    """
    if not galleries:
        raise ValueError("identify_galleries: at least one gallery is required")
    names = list(names) if names is not None else [f"G{i + 1}" for i in range(len(galleries))]
    if len(names) != len(galleries):
        raise ValueError(f"identify_galleries: {len(galleries)} galleries but {len(names)} names")
    knns = list(knn) if isinstance(knn, Sequence) else [knn] * len(galleries)
    if len(knns) != len(galleries):
        raise ValueError(f"identify_galleries: {len(galleries)} galleries but {len(knns)} kNN backends")
    max_rank = max(cmc_ranks, max(ks, default=1))
    outcomes = tuple(
        identify(g.ids, g.subjects, g.feats, probes.ids, probes.subjects, probes.feats,
                 kn, ks, fpirs, max_rank, nm)
        for g, kn, nm in zip(galleries, knns, names)
    )
    return identification_result(outcomes, ks, fpirs, cmc_ranks)


def identification_result(
    outcomes: Sequence[GalleryOutcome],
    ks: Sequence[int] = KS,
    fpirs: Sequence[float] = FPIRS,
    cmc_ranks: int = CMC_RANKS,
) -> IdentificationResult:
    """Combine per-gallery outcomes (unit weights) into an :class:`IdentificationResult`."""
    max_rank = max(cmc_ranks, max(ks, default=1))
    metrics, cmc, per_gallery, notes = weighted_metrics(outcomes, None, ks, fpirs, max_rank)
    return IdentificationResult(
        metrics={k: float(v[0]) for k, v in metrics.items()},
        cmc=cmc[0, :cmc_ranks],
        per_gallery={n: {k: float(v[0]) for k, v in st.items()} for n, st in per_gallery.items()},
        outcomes=tuple(outcomes),
        notes=tuple(notes),
    )
