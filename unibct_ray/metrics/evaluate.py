"""IJB-C evaluation from per-image features: self_old, self_new and cross (ARCHITECTURE §6).

Ray-free glue over the metric modules; the distributed job only produces the features.

- Templates are pooled once per model; the three tests reuse them.
- Cross test: 1:1 enrolment side (``pairs[:, 0]``) OLD, verification side (``pairs[:, 1]``)
  NEW; 1:N galleries OLD, probes NEW.
- In IJB-C the 1:N galleries are the 1:1 enrolment templates and the probes the
  verification templates, so both protocols need the same (enrolment x verification)
  score grid. With the exact brute-force backend that grid is computed once per test
  (one float32 GEMM) and serves the pair scores and the 1:N ranks alike
  (``reuse_scores=True``; ranks by counting, :func:`outcome_from_scores`); any other
  backend (FAISS, shards, distractors) is called as given.
- ``knn`` may differ per gallery model (``{"old": KNN, "new": KNN}``): a 1:N test searches
  with the backend of the model on its gallery side (self_old and cross: "old"; self_new:
  "new"), e.g. distractors embedded by that same model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from unibct_ray.data.ijbc import IJBCMeta, TemplateSubjects
from unibct_ray.metrics.bootstrap import BootstrapResult, enrolment_subjects, subject_bootstrap
from unibct_ray.metrics.identification import (
    CMC_RANKS,
    FPIRS,
    KS,
    IdentificationResult,
    TemplateSet,
    identification_result,
    identify_galleries,
    metric_keys,
    outcome_from_scores,
)
from unibct_ray.metrics.knn import KNN, brute_force_knn, knn_description
from unibct_ray.metrics.report import build_report
from unibct_ray.metrics.templates import image_features, pool_templates, template_rows
from unibct_ray.metrics.verification import (
    FARS,
    PairIndex,
    RocCurve,
    VerificationResult,
    pair_scores,
    rate_key,
    tar_from_roc,
    verify,
)

__all__ = ["Features", "EvalCurves", "evaluate_features", "per_model_text"]

#: Precomputed ``emb + emb_flip`` [n, d], or the pair ``(emb [n, d], emb_flip [n, d])``.
Features = np.ndarray | tuple[np.ndarray, np.ndarray]

# Largest (enrolment x verification) grid kept whole for reuse (float32: 1 GiB).
_MAX_GRID_ELEMS = 1 << 28
# Rows per finiteness check (bounds the boolean temporary).
_CHECK_ROWS = 1 << 16


@dataclass(frozen=True, eq=False)
class EvalCurves:
    """Everything besides the report dict: curves for plotting and the raw results.

    Attributes:
        roc: {test: RocCurve}; cmc: {test: float64 [K] identification rate at ranks 1..K}.
        verification / identification: full per-test results (notes, per-gallery values,
            per-probe outcomes).
        pair_scores: {test: float32 [m]} 1:1 scores in ``meta.pairs`` order.
        bootstrap: the bootstrap result, or None when disabled.
        seconds: wall time per stage.
    """

    roc: dict[str, RocCurve]
    cmc: dict[str, np.ndarray]
    verification: dict[str, VerificationResult]
    identification: dict[str, IdentificationResult]
    pair_scores: dict[str, np.ndarray]
    bootstrap: BootstrapResult | None
    seconds: dict[str, float]


def _prepare(feats: Features, name: str, n_images: int, use_flip: bool) -> tuple[np.ndarray, str]:
    """Validate one model's features -> (float32-compatible [n, d], flip description)."""
    if isinstance(feats, tuple):
        if len(feats) != 2:
            raise ValueError(f"{name} features: expected (emb, emb_flip), got {len(feats)} arrays")
        emb, flip = np.asarray(feats[0]), np.asarray(feats[1])
        if emb.ndim != 2 or flip.shape != emb.shape:
            raise ValueError(
                f"{name} features: emb {emb.shape} and emb_flip {flip.shape} must both be [n, d]"
            )
        x = image_features(emb, flip, None, use_flip=use_flip, use_score=False)
        how = "emb + emb(flipped)" if use_flip else "emb only (flip disabled)"
    else:
        x = np.asarray(feats)
        how = "precomputed per-image features (taken as emb + emb(flipped))"
    if x.ndim != 2:
        raise ValueError(f"{name} features must be [n_images, d], got shape {x.shape}")
    if x.shape[0] != n_images:
        raise ValueError(
            f"{name} features have {x.shape[0]} rows but the IJB-C meta lists {n_images} images "
            "(rows must follow the 5pts/tid_mid file order)"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} features have dimension 0")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} features must be floating point, got {x.dtype}")
    return x, how


def per_model_text(desc: Mapping[str, str]) -> str:
    """One protocol line from a description per model: the text once when the models agree,
    else ``old: ...; new: ...``."""
    if len(set(desc.values())) <= 1:
        return next(iter(desc.values()), "")
    return "; ".join(f"{m}: {d}" for m, d in desc.items())


def _raise_non_finite(x: np.ndarray, name: str) -> None:
    """Name the first image row of ``x`` [n, d] holding NaN or inf (the slow path).

    Only called when a pooled template is not finite: NaN/inf in any image always reaches
    its template (sums, products with weights and the normalisation keep it), so the
    cheap check on [t, d] templates replaces one on [n, d] images.
    """
    for lo in range(0, x.shape[0], _CHECK_ROWS):
        ok = np.isfinite(x[lo : lo + _CHECK_ROWS]).all(1)
        if not ok.all():
            row = lo + int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{name} features: row {row} (image {row + 1} of the meta) contains NaN or inf"
            )
    raise ValueError(f"{name} features: pooled templates are not finite")


def _knn_for(knn: KNN | Mapping[str, KNN], gallery_model: str) -> KNN:
    """The 1:N backend for galleries of ``gallery_model`` ("old" / "new")."""
    if not isinstance(knn, Mapping):
        return knn
    if gallery_model not in knn:
        raise ValueError(f"evaluate_features: knn has backends for {sorted(knn)} but no {gallery_model!r} "
                         f"one for the galleries of the {gallery_model} model")
    return knn[gallery_model]


def _knn_protocol(knn: KNN | Mapping[str, KNN], models: Sequence[str]) -> str:
    """The report's kNN description; per gallery model when they differ."""
    if not isinstance(knn, Mapping):
        return knn_description(knn)
    desc = {m: knn_description(knn[m]) for m in models if m in knn}
    if len(set(desc.values())) == 1:
        return next(iter(desc.values()))
    return "; ".join(f"{m} galleries: {d}" for m, d in desc.items())


def _nan_metrics(keys: Sequence[str]) -> dict[str, float]:
    return {k: float("nan") for k in keys}


def evaluate_features(
    meta: IJBCMeta,
    old_feats: Features | None,
    new_feats: Features | None,
    knn: KNN | Mapping[str, KNN] = brute_force_knn,
    criterion_far: float = 1e-4,
    bootstrap: int = 0,
    seed: int = 0,
    *,
    use_flip: bool = True,
    use_score: bool = True,
    fars: Sequence[float] = FARS,
    ks: Sequence[int] = KS,
    fpirs: Sequence[float] = FPIRS,
    roc_backend: Literal["fast", "sklearn"] = "fast",
    reuse_scores: bool = True,
    full_roc: bool = False,
) -> tuple[dict[str, Any], EvalCurves]:
    """Run the IJB-C 1:1 and 1:N tests for one or two models and build the report.

    Args:
        meta: IJB-C meta (:func:`unibct_ray.data.ijbc.read_ijbc_meta`).
        old_feats, new_feats: per-image features of the old / new model in meta row
            order, either precomputed ``emb + emb_flip`` [n, d] or ``(emb, emb_flip)``;
            at least one. With both, self_old, self_new and cross run; with one, only its
            self test and ``compatible`` is null.
        knn: 1:N backend (:mod:`unibct_ray.metrics.knn`), or one per gallery model
            ``{"old": KNN, "new": KNN}`` (self_old and cross search old galleries, self_new
            new ones; only the models given need a backend).
        criterion_far: FAR of the compatibility criterion.
        bootstrap: subject resamples for 95% intervals (0 disables).
        seed: bootstrap seed.
        use_flip: add the flipped embedding when ``(emb, emb_flip)`` is given.
        use_score: weight image features by the detector score (``meta.scores``).
        roc_backend: "fast" (exact sklearn-equivalent) or "sklearn".
        reuse_scores: share one score grid between 1:1 and 1:N (brute force only).
        full_roc: keep the whole ROC in the curves (default: the head up to FPR 2 x the
            largest FAR, which gives the same TARs; the ROC plot then ends there).

    Returns:
        (report dict as in :func:`unibct_ray.metrics.report.build_report`, :class:`EvalCurves`).

    Raises:
        ValueError: wrong row count, dimension mismatch between old and new, NaN/inf
            features or scores, pairs or 1:N templates without images.
    """
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    if old_feats is None and new_feats is None:
        raise ValueError("evaluate_features: give old_feats, new_feats or both")
    if int(bootstrap) < 0:
        raise ValueError(f"evaluate_features: bootstrap must be >= 0, got {bootstrap}")
    n = meta.n_images
    for name, arr in (("templates", meta.templates), ("medias", meta.medias), ("scores", meta.scores)):
        if np.asarray(arr).shape != (n,):
            raise ValueError(f"IJB-C meta: {name} has shape {np.asarray(arr).shape}, expected [{n}]")
    det = np.asarray(meta.scores, np.float64)
    if use_score and not np.isfinite(det).all():
        raise ValueError(
            f"IJB-C meta: detector score of image {int(np.flatnonzero(~np.isfinite(det))[0]) + 1} "
            "is not finite"
        )
    models: dict[str, np.ndarray] = {}
    flip_hows: dict[str, str] = {}
    for name, f in (("old", old_feats), ("new", new_feats)):
        if f is not None:
            models[name], flip_hows[name] = _prepare(f, name, n, use_flip)
    flip_how = per_model_text(flip_hows)
    if len(models) == 2 and models["old"].shape[1] != models["new"].shape[1]:
        raise ValueError(
            f"cross test needs one embedding space: old features have dim "
            f"{models['old'].shape[1]}, new features dim {models['new'].shape[1]}"
        )
    secs["validate"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    weights = det if use_score else None
    pooled: dict[str, np.ndarray] = {}
    template_ids = np.zeros(0, np.int64)
    for name, x in models.items():
        template_ids, pooled[name] = pool_templates(x, meta.templates, meta.medias, weights)
        if not np.isfinite(pooled[name]).all():
            _raise_non_finite(x, name)
    secs["pool_templates"] = time.perf_counter() - t1

    tests: list[tuple[str, str, str]] = []
    if "old" in pooled:
        tests.append(("self_old", "old", "old"))
    if "new" in pooled:
        tests.append(("self_new", "new", "new"))
    if len(pooled) == 2:
        tests.append(("cross", "old", "new"))

    notes: list[str] = []
    t2 = time.perf_counter()
    pairs = np.asarray(meta.pairs)
    labels = np.asarray(meta.pair_labels)
    pidx = PairIndex.build(template_ids, pairs) if pairs.shape[0] else None
    if pidx is None:
        notes.append("no 1:1 pairs in the meta: verification undefined")
    has_1n = meta.has_1n
    gal_lists: list[TemplateSubjects] = [meta.gallery1, meta.gallery2]
    gal_files = ["gallery G1 (ijbc_1N_gallery_G1.csv)", "gallery G2 (ijbc_1N_gallery_G2.csv)"]
    gal_rows = [template_rows(template_ids, g.templates, f) for g, f in zip(gal_lists, gal_files)]
    probe_rows = template_rows(template_ids, meta.probes.templates, "probes (ijbc_1N_probe_mixed.csv)")
    if not has_1n:
        notes.append("no 1:N lists in the meta: identification undefined")
    grid_ok = (
        reuse_scores
        and all(_knn_for(knn, m) is brute_force_knn for m in models)
        and pidx is not None
        and has_1n
        and pidx.enrol_rows.size * pidx.verif_rows.size <= _MAX_GRID_ELEMS
        and all(np.isin(r, pidx.enrol_rows).all() for r in gal_rows)
        and np.isin(probe_rows, pidx.verif_rows).all()
    )
    secs["resolve"] = time.perf_counter() - t2

    # The shared grid, rows ordered [G1 | G2 | other enrolment templates]: each gallery's 1:N
    # scores are then a row slice (a view) of it, and the 1:1 pairs read it at flat offsets.
    grid_parts: list[tuple[int, int]] = []
    grid_rows = a_grid = None
    if grid_ok and pidx is not None:
        rest = np.setdiff1d(pidx.enrol_rows, np.concatenate(gal_rows))
        grid_rows = np.concatenate([*gal_rows, rest])
        lo = 0
        for r in gal_rows:
            grid_parts.append((lo, lo + r.size))
            lo += r.size
        if grid_rows.size * pidx.verif_rows.size > _MAX_GRID_ELEMS:
            grid_ok = False
        else:
            # Every enrolment row occurs in grid_rows, so the unique rows are enrol_rows and
            # first[i] is the grid row of enrol_rows[i] (a template in both galleries: G1's).
            _, first = np.unique(grid_rows, return_index=True)
            # Each pair's offset in the flattened grid, once for the three tests: a 1-D take
            # reads the 15.7M scores in about half the time of a 2-D fancy index.
            cell_t = np.int32 if grid_rows.size * pidx.verif_rows.size < (1 << 31) else np.int64
            a_grid = first.astype(cell_t)[pidx.a] * cell_t(pidx.verif_rows.size) + pidx.b.astype(cell_t)
    p_pos = np.searchsorted(pidx.verif_rows, probe_rows) if grid_ok and pidx is not None else None

    id_keys = metric_keys(ks, fpirs)
    # The report needs TAR at the FARs and the criterion only: the ROC is built up to twice
    # the largest of them (FPR 0.2 by default) from the top ~20 % of the scores.
    head_far = None if full_roc else max([*fars, criterion_far])

    ver: dict[str, VerificationResult] = {}
    idr: dict[str, IdentificationResult] = {}
    scores_by_test: dict[str, np.ndarray] = {}
    crit: dict[str, float] = {}
    for test, e_name, v_name in tests:
        te = time.perf_counter()
        fe, fv = pooled[e_name], pooled[v_name]
        if grid_ok and pidx is not None:
            grid = fe[grid_rows] @ fv[pidx.verif_rows].T  # [rows, u2] float32
            scores = grid.ravel().take(a_grid)
            sub = [grid[a:b] for a, b in grid_parts]  # views, [g, u2]
            if p_pos.size != pidx.verif_rows.size:  # (sorted, so all probes means p_pos = arange)
                sub = [x[:, p_pos] for x in sub]
            del grid
        elif pidx is not None:
            scores = pair_scores(template_ids, fe, fv, pairs, index=pidx)
        else:
            scores = np.zeros(0, np.float32)
        secs[f"{test}/scores"] = time.perf_counter() - te
        tv = time.perf_counter()
        vr = verify(scores, labels, fars, backend=roc_backend, head_far=head_far)
        ver[test] = vr
        crit[test] = tar_from_roc(vr.roc, [criterion_far])[rate_key(criterion_far)]
        notes.extend(f"verification/{test}: {x}" for x in vr.notes)
        scores_by_test[test] = scores
        secs[f"{test}/verification"] = time.perf_counter() - tv
        ti = time.perf_counter()
        if has_1n:
            galleries = [TemplateSet(g.templates, g.subjects, fe[r]) for g, r in zip(gal_lists, gal_rows)]
            probes = TemplateSet(meta.probes.templates, meta.probes.subjects, fv[probe_rows])
            if grid_ok:
                # Exact ranks straight from the grid rows of each gallery (no top-k sort).
                outs = tuple(
                    outcome_from_scores(x, g.subjects, probes.subjects, max(CMC_RANKS, max(ks)), nm)
                    for x, g, nm in zip(sub, galleries, ("G1", "G2"))
                )
                del sub
                ir = identification_result(outs, ks, fpirs)
            else:
                ir = identify_galleries(galleries, probes, _knn_for(knn, e_name), ks, fpirs, ("G1", "G2"))
            idr[test] = ir
            notes.extend(f"identification/{test}: {x}" for x in ir.notes)
        secs[f"{test}/identification"] = time.perf_counter() - ti

    boot: BootstrapResult | None = None
    if int(bootstrap) > 0:
        tb = time.perf_counter()
        known_t = np.concatenate([meta.gallery1.templates, meta.gallery2.templates, meta.probes.templates])
        known_s = np.concatenate([meta.gallery1.subjects, meta.gallery2.subjects, meta.probes.subjects])
        pair_subj, unmapped = enrolment_subjects(pairs[:, 0], known_t, known_s) if pidx is not None \
            else (np.zeros(0, np.int64), 0)
        if unmapped:
            notes.append(
                f"bootstrap: {unmapped} pairs have an enrolment template without a subject in the "
                "1:N lists; each such template is resampled as its own cluster"
            )
        boot = subject_bootstrap(
            int(bootstrap), int(seed),
            pair_scores=scores_by_test if pidx is not None else None,
            pair_labels=labels, pair_subjects=pair_subj,
            identification={t: r.outcomes for t, r in idr.items()} if idr else None,
            probe_subjects=meta.probes.subjects,
            fars=fars, ks=ks, fpirs=fpirs, criterion_far=criterion_far,
        )
        secs["bootstrap"] = time.perf_counter() - tb

    n_gen = int((labels == 1).sum())
    protocol = {
        "fars": list(fars),
        "ks": list(ks),
        "fpirs": list(fpirs),
        "flip": flip_how,
        "detector_score_weighting": bool(use_score),
        "template_pooling": "L2-normalise(sum over media of mean image feature)",
        "roc": "sklearn.metrics.roc_curve defaults (drop_intermediate=True)"
               + ("" if full_roc else f"; points up to FPR {2 * head_far:g} (enough for TAR at FAR <= {head_far:g})"),
        "roc_backend": roc_backend,
        "tar_rule": "TPR at the ROC point with FPR nearest to FAR; ties -> higher TPR",
        "tpir_rule": "threshold = non-mated max scores sorted descending at "
                     "max(floor(N_nm * FPIR) - 1, 0); mated counts if rank-1 correct and score > "
                     "threshold; TPIR = mean over G1, G2",
        "topk_rule": "(hits G1 + hits G2) / number of probes; ties ranked by lower gallery index",
        "cross_test": "1:1 pairs[:, 0] OLD, pairs[:, 1] NEW; 1:N galleries OLD, probes NEW",
        "knn": _knn_protocol(knn, list(models)),
        "score_grid_shared": bool(grid_ok),
        "seed": int(seed),
        "bootstrap_unit": "subject (enrolment subject for 1:1, probe subject for 1:N)",
    }
    counts = {
        "images": n,
        "templates": int(template_ids.size),
        "pairs": int(pairs.shape[0]),
        "genuine_pairs": n_gen,
        "impostor_pairs": int(pairs.shape[0]) - n_gen,
        "gallery_G1": len(meta.gallery1),
        "gallery_G2": len(meta.gallery2),
        "probes": len(meta.probes),
        "dim": int(next(iter(models.values())).shape[1]),
    }
    report = build_report(
        {t: v.tar for t, v in ver.items()},
        {t: (idr[t].metrics if t in idr else _nan_metrics(id_keys)) for t in ver},
        criterion_far=criterion_far,
        criterion_tar=crit,
        bootstrap=boot,
        protocol=protocol,
        counts=counts,
        notes=notes,
    )
    secs["total"] = time.perf_counter() - t0
    curves = EvalCurves(
        roc={t: v.roc for t, v in ver.items()},
        cmc={t: r.cmc for t, r in idr.items()},
        verification=ver,
        identification=idr,
        pair_scores=scores_by_test,
        bootstrap=boot,
        seconds=secs,
    )
    return report, curves
