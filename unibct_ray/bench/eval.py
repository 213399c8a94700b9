"""Benchmark: the IJB-C report from precomputed features, ours vs the public algorithm.

``python -m unibct_ray.bench.eval [--scale full|small|tiny]`` prints one JSON object.

The data is generated in memory at IJB-C scale (no image files): 469,375 images, 23,124
templates, 15,658,489 pairs (19,557 genuine), 1:N galleries of 1,772 and 1,759 templates
and 19,593 probes; 512-d float32 features with identity structure (subject centre +
template nuisance + image noise, times a random norm), for an OLD and a NEW model.

Sides, each in its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

- **ours**: :func:`unibct_ray.metrics.evaluate.evaluate_features` (self_old, self_new,
  cross; 1:1 and 1:N; ``bootstrap=0``) plus :func:`write_report`.
- **public**: the algorithm of insightface's IJB-C evaluation written plainly here:
  per-template ``np.where`` pooling loop, float64 pair products in batches of 100k,
  ``sklearn.metrics.roc_curve``, TAR at the nearest FPR (lowest index on ties), and a
  straightforward 1:N (float64 similarity, full argsort, a Python loop over probes), run
  once per test (self_old, self_new, cross), pooling the features each run needs.

- **cli**: what a user runs, end to end: the generated data written as an IJB-C meta folder
  (``write_ijbc_folder``) and two float32 ``.npy`` feature files, then ``unibct-ray eval
  --ijbc ROOT --old-features F --new-features G --out O --bootstrap 0`` in a subprocess,
  timed by wall clock from process start to exit (interpreter start, imports, meta parsing,
  feature loading and checks, the report and its plots). Run twice: ``cold`` (no meta cache
  yet) and ``warm`` (a second evaluation of the same folder, its parsed meta cached). Peak
  memory is the CLI process's own ``ru_maxrss`` (``os.wait4``).

Both sides get identical data (same seed). Data generation is excluded from the timings
but included in the peak RSS of ours/public (it is the features' own memory).

Why one file of ~640 lines: the public algorithm (re-implemented plainly, as the reference), the
full-scale synthetic IJB-C and the CLI runner belong to one side-by-side measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from unibct_ray.data.ijbc import IJBCMeta, TemplateSubjects

__all__ = [
    "FULL",
    "synthetic_ijbc",
    "public_pool_templates",
    "public_pair_scores",
    "public_identification",
    "run_ours",
    "run_public",
    "run_cli",
    "write_ijbc_folder",
    "main",
]

#: The real IJB-C sizes (ARCHITECTURE §6).
FULL = {
    "images": 469_375,
    "templates": 23_124,
    "pairs": 15_658_489,
    "genuine": 19_557,
    "g1": 1_772,
    "g2": 1_759,
    "probes": 19_593,
}
SCALES = {"full": 1.0, "small": 0.1, "tiny": 0.01}
_GEN_ROWS = 1 << 15  # image rows generated per step (bounds float32 temporaries)


# --------------------------------------------------------------------------- data


def synthetic_ijbc(
    scale: float = 1.0, seed: int = 0, dim: int = 512, impostor_pairs: int | None = None
) -> tuple[IJBCMeta, np.ndarray, np.ndarray, dict[str, float]]:
    """IJB-C-shaped meta and OLD/NEW per-image features, generated in memory.

    Sizes are the real ones times ``scale`` (pairs times ``scale**2``, since pairs span
    gallery x probe). Every gallery subject has one gallery template; a probe's subject is
    drawn from the gallery subjects; genuine pairs are (gallery template, probe) of one
    subject, impostor pairs distinct random (gallery, probe) of different subjects
    (``impostor_pairs`` of them when given, capped at what exists). Pairs are grouped by
    enrolment template, as in the real pair file.

    Returns:
        (meta, old [n, dim] float32, new [n, dim] float32, {"meta_s", "features_s"}).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    g1 = max(1, round(FULL["g1"] * scale))
    g2 = max(1, round(FULL["g2"] * scale))
    n_sub = g1 + g2
    n_probe = max(2, round(FULL["probes"] * scale))
    n_tpl = n_sub + n_probe
    n_img = max(n_tpl, round(FULL["images"] * scale))
    n_gen = min(n_probe, round(FULL["genuine"] * scale))
    if impostor_pairs is None:
        impostor_pairs = round((FULL["pairs"] - FULL["genuine"]) * scale * scale)
    n_imp = min(int(impostor_pairs), n_sub * n_probe - n_probe)

    tpl_ids = rng.choice(np.arange(1, 10 * n_tpl + 1), size=n_tpl, replace=False)
    gallery_t, probe_t = tpl_ids[:n_sub], tpl_ids[n_sub:]
    probe_subj_idx = rng.integers(0, n_sub, n_probe)  # subject index 0..n_sub-1
    subj_ids = np.arange(n_sub, dtype=np.int64) + 1000
    tpl_subj_idx = np.r_[np.arange(n_sub), probe_subj_idx]

    # Images per template >= 1, skewed like real templates (a few long videos).
    p = rng.lognormal(0.0, 1.0, n_tpl)
    sizes = 1 + rng.multinomial(n_img - n_tpl, p / p.sum())
    img_tpl = np.repeat(np.arange(n_tpl), sizes)  # template index of each image row
    starts = rng.random(n_img) < 0.35
    starts[np.r_[0, np.cumsum(sizes)[:-1]]] = True  # every template starts a media
    medias = np.cumsum(starts).astype(np.int64) + 100_000
    det = rng.uniform(0.3, 1.0, n_img).astype(np.float32)
    low = rng.random(n_img) < 0.05
    det[low] = rng.uniform(0.02, 0.3, int(low.sum())).astype(np.float32)

    # Pairs: genuine (gallery of the probe's subject, probe) + impostors without repeats.
    gen_probes = rng.choice(n_probe, size=n_gen, replace=False)
    # Impostors: a Bernoulli draw over the gallery x probe grid slightly above the target
    # rate, same-subject cells removed, then random surplus cells dropped: O(grid) and
    # ~3x faster than Generator.choice(replace=False) on a 69M grid.
    grid = n_sub * n_probe
    rate = min(1.0, (n_imp + 8.0 * math.sqrt(n_imp) + 100.0) / max(grid - n_probe, 1))
    flat = np.flatnonzero(rng.random(grid, dtype=np.float32) < rate)
    gi, pi = flat // n_probe, flat % n_probe
    keep = gi != probe_subj_idx[pi]
    gi, pi = gi[keep], pi[keep]
    if gi.size < n_imp:  # (practically never) too few cells drawn: take them all exactly
        flat = rng.choice(grid, size=grid, replace=False)
        gi, pi = flat // n_probe, flat % n_probe
        keep = gi != probe_subj_idx[pi]
        gi, pi = gi[keep], pi[keep]
    surplus = gi.size - n_imp
    if surplus > 0:
        drop = np.zeros(gi.size, bool)
        drop[rng.choice(gi.size, size=surplus, replace=False)] = True
        gi, pi = gi[~drop], pi[~drop]
    # One ordered list like the real file (grouped by enrolment template): impostor
    # cells are already in grid order, genuine cells are merged in by position, O(m).
    imp_key = gi * n_probe + pi
    gen_key = probe_subj_idx[gen_probes] * n_probe + gen_probes
    at = np.searchsorted(imp_key, gen_key)
    key = np.insert(imp_key, at, gen_key)
    labels = np.insert(np.zeros(imp_key.size, np.int8), at, np.ones(gen_key.size, np.int8))
    pairs = np.stack([gallery_t[key // n_probe], probe_t[key % n_probe]], 1).astype(np.int64)

    def tsubjects(t_idx: np.ndarray, s_idx: np.ndarray) -> TemplateSubjects:
        o = np.argsort(t_idx)
        return TemplateSubjects(t_idx[o].astype(np.int64), subj_ids[s_idx[o]])

    meta = IJBCMeta(
        root=Path("synthetic-ijbc"),
        image_names=[f"img/{i}.jpg" for i in range(n_img)],
        templates=tpl_ids[img_tpl].astype(np.int64),
        medias=medias,
        landmarks=np.zeros((n_img, 5, 2), np.float32),
        scores=det,
        pairs=pairs,
        pair_labels=labels,
        gallery1=tsubjects(gallery_t[:g1], np.arange(g1)),
        gallery2=tsubjects(gallery_t[g1:], np.arange(g1, n_sub)),
        probes=tsubjects(probe_t, probe_subj_idx),
    )
    t1 = time.perf_counter()

    # Features: unit subject centre + template nuisance (pose/quality, partly shared by
    # both models) + image noise, times a random norm. The new model has less nuisance.
    inv = np.float32(1.0 / math.sqrt(dim))
    centres = rng.standard_normal((n_sub, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    quality = rng.uniform(0.8, 3.2, n_tpl).astype(np.float32)
    nuis_old = rng.standard_normal((n_tpl, dim), dtype=np.float32) * inv
    nuis_new = 0.6 * nuis_old + 0.8 * rng.standard_normal((n_tpl, dim), dtype=np.float32) * inv
    amp = {"old": quality, "new": 0.75 * quality}
    nuis = {"old": nuis_old, "new": nuis_new}
    feats = {k: np.empty((n_img, dim), np.float32) for k in ("old", "new")}
    norms = rng.uniform(15.0, 30.0, n_img).astype(np.float32)
    for lo in range(0, n_img, _GEN_ROWS):
        hi = min(lo + _GEN_ROWS, n_img)
        t = img_tpl[lo:hi]
        base = centres[tpl_subj_idx[t]]
        for k in ("old", "new"):
            x = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            x *= 1.5 * inv
            x += base
            x += amp[k][t, None] * nuis[k][t]
            x *= norms[lo:hi, None]
            feats[k][lo:hi] = x
    t2 = time.perf_counter()
    return meta, feats["old"], feats["new"], {"meta_s": t1 - t0, "features_s": t2 - t1}


def write_ijbc_folder(meta: IJBCMeta, root: Path, seed: int = 0) -> Path:
    """Write ``meta`` as an IJB-C meta folder ``root/IJBC/meta`` (the insightface layout).

    Image names become ``<row>.jpg`` (no image files: the CLI reads features, not images);
    landmarks are random points; each 1:N CSV has one row per image of its templates, as
    the real lists do. Returns the IJB-C root to pass as ``--ijbc``.
    """
    from unibct_ray.data.ijbc_writers import (
        write_1n_csv, write_5pts_score, write_pair_label, write_tid_mid)
    from unibct_ray.data import ijbc

    meta_dir = root / "IJBC" / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i}.jpg" for i in range(meta.n_images)]
    rng = np.random.default_rng(seed)
    landmarks = rng.uniform(20.0, 100.0, (meta.n_images, 5, 2)).astype(np.float32)
    write_tid_mid(meta_dir / ijbc.TID_MID_FILE, names, meta.templates, meta.medias)
    write_5pts_score(meta_dir / ijbc.NAME_5PTS_FILE, names, landmarks, meta.scores)
    write_pair_label(meta_dir / ijbc.PAIR_LABEL_FILE, meta.pairs, meta.pair_labels)
    order = np.argsort(meta.templates, kind="stable")
    sorted_t = meta.templates[order]
    for fname, ts in ((ijbc.GALLERY1_FILE, meta.gallery1), (ijbc.GALLERY2_FILE, meta.gallery2),
                      (ijbc.PROBE_FILE, meta.probes)):
        lo = np.searchsorted(sorted_t, ts.templates, side="left")
        hi = np.searchsorted(sorted_t, ts.templates, side="right")
        rows = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(ts) else np.zeros(0, np.int64)
        subj = np.repeat(ts.subjects, hi - lo)
        write_1n_csv(meta_dir / fname, meta.templates[rows], subj, [names[r] for r in rows])
    return root


# --------------------------------------------------------------------------- public algorithm


def public_pool_templates(
    img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Template pooling as the public script does it: a loop over templates, ``np.where``
    per template and per media, float64 result, sklearn ``normalize``.

    Returns:
        (template features float64 [t, d], sorted unique template ids [t]).
    """
    from sklearn.preprocessing import normalize

    uniq = np.unique(templates)
    out = np.zeros((uniq.size, img_feats.shape[1]))
    for i, tid in enumerate(uniq):
        (rows,) = np.where(templates == tid)
        f, med = img_feats[rows], medias[rows]
        media_ids, media_counts = np.unique(med, return_counts=True)
        per_media = []
        for mid, cnt in zip(media_ids, media_counts):
            (sel,) = np.where(med == mid)
            per_media.append(f[sel] if cnt == 1 else np.mean(f[sel], axis=0, keepdims=True))
        out[i] = np.sum(np.array(per_media), axis=0)
    return normalize(out), uniq


def public_pair_scores(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    template_ids: np.ndarray,
    pairs: np.ndarray,
    batch: int = 100_000,
    fraction: float = 1.0,
) -> tuple[np.ndarray, int]:
    """Pair scores as the public script computes them: an id -> row table, then float64
    products of gathered rows in batches of ``batch`` pairs.

    With ``fraction`` < 1 only the first ``ceil(fraction * batches)`` batches are computed
    (the caller extrapolates); the rest of the array stays 0.

    Returns:
        (scores float64 [m], batches computed).
    """
    row_of = np.zeros(int(template_ids.max()) + 1, dtype=int)
    for i, tid in enumerate(template_ids):
        row_of[tid] = i
    m = pairs.shape[0]
    scores = np.zeros(m)
    starts = list(range(0, m, batch))
    todo = starts[: max(1, math.ceil(fraction * len(starts)))]
    for lo in todo:
        sel = np.arange(lo, min(lo + batch, m))
        fa = feats_a[row_of[pairs[sel, 0]]]
        fb = feats_b[row_of[pairs[sel, 1]]]
        scores[sel] = np.sum(fa * fb, -1)
    return scores, len(todo)


def public_tar(fpr: np.ndarray, tpr: np.ndarray, fars: list[float]) -> list[float]:
    """TPR at the nearest FPR, first (lowest-TPR) point on ties, as the public script."""
    return [float(tpr[np.argmin(np.abs(fpr - f))]) for f in fars]


def public_identification(
    gallery_feats: list[np.ndarray],
    gallery_subjects: list[np.ndarray],
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    fpirs: tuple[float, ...] = (1e-2, 1e-1),
) -> dict[str, float]:
    """1:N written plainly: float64 similarity, full argsort per probe row, a Python loop
    over probes for ranks; threshold/TPIR per ARCHITECTURE §6; mean TPIR over galleries."""
    n_probes = probe_feats.shape[0]
    hits = {k: 0 for k in ks}
    tpirs: dict[float, list[float]] = {f: [] for f in fpirs}
    for gf, gs in zip(gallery_feats, gallery_subjects):
        sim = np.dot(probe_feats, gf.T)
        order = np.argsort(-sim, axis=1)
        gallery_set = set(gs.tolist())
        mated_top1, nonmated_top1 = [], []
        for i in range(n_probes):
            top = order[i]
            best = sim[i, top[0]]
            if probe_subjects[i] in gallery_set:
                ranked = gs[top[: max(ks)]]
                where = np.where(ranked == probe_subjects[i])[0]
                rank = int(where[0]) + 1 if where.size else 0
                for k in ks:
                    if 0 < rank <= k:
                        hits[k] += 1
                mated_top1.append((rank == 1, best))
            else:
                nonmated_top1.append(best)
        nm = sorted(nonmated_top1, reverse=True)
        for f in fpirs:
            idx = max(int(math.floor(len(nm) * f)) - 1, 0)
            thr = nm[idx]
            ok = sum(1 for correct, s in mated_top1 if correct and s > thr)
            tpirs[f].append(ok / len(mated_top1))
    out = {f"top{k}": hits[k] / n_probes for k in ks}
    for f in fpirs:
        out[f"tpir@fpir={f:.0e}".replace("e-0", "e-")] = float(np.mean(tpirs[f]))
    return out


# --------------------------------------------------------------------------- sides


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (less sensitive to a busy machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_ours(scale: float, seed: int, bootstrap_n: int, check_sklearn: bool) -> dict[str, Any]:
    """Time the whole report (evaluate_features + write_report) on generated data."""
    from unibct_ray.metrics.evaluate import evaluate_features
    from unibct_ray.metrics.report import write_report
    from unibct_ray.metrics.verification import roc_curve

    meta, old, new, gen = synthetic_ijbc(scale, seed)
    rss_data = _rss_now_mb()
    c0 = _cpu_s()
    t0 = time.perf_counter()
    report, curves = evaluate_features(meta, old, new, bootstrap=0)
    t_eval = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        write_report(report, tmp, curves.roc, curves.cmc)
        t_write = time.perf_counter() - t1
    cpu = _cpu_s() - c0
    out: dict[str, Any] = {
        "seconds": round(t_eval + t_write, 3),
        "cpu_seconds": round(cpu, 3),
        "evaluate_seconds": round(t_eval, 3),
        "write_report_seconds": round(t_write, 3),
        "stage_seconds": {k: round(v, 3) for k, v in curves.seconds.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_data_mb": round(rss_data, 1),
        "generation_seconds": {k: round(v, 2) for k, v in gen.items()},
        "counts": report["counts"],
        "verification": report["verification"],
        "identification": report["identification"],
        "compatible": report["compatible"],
        "difference": report["difference"]["value"],
    }
    if bootstrap_n > 0:
        from unibct_ray.metrics.bootstrap import enrolment_subjects, subject_bootstrap

        known_t = np.concatenate([meta.gallery1.templates, meta.gallery2.templates,
                                  meta.probes.templates])
        known_s = np.concatenate([meta.gallery1.subjects, meta.gallery2.subjects,
                                  meta.probes.subjects])
        pair_subj, _ = enrolment_subjects(meta.pairs[:, 0], known_t, known_s)
        tb = time.perf_counter()
        boot = subject_bootstrap(
            bootstrap_n, seed,
            pair_scores=curves.pair_scores,
            pair_labels=meta.pair_labels, pair_subjects=pair_subj,
            identification={t: r.outcomes for t, r in curves.identification.items()},
            probe_subjects=meta.probes.subjects,
        )
        tb = time.perf_counter() - tb
        per_rep = (tb - boot.setup_seconds) / bootstrap_n
        out["bootstrap"] = {
            "n": bootstrap_n,
            "seconds": round(tb, 2),
            "setup_seconds": round(boot.setup_seconds, 2),
            "seconds_per_replicate": round(per_rep, 3),
            "projected_seconds_n100": round(boot.setup_seconds + 100 * per_rep, 1),
            "difference_ci95": boot.difference,
            "peak_rss_mb_incl_bootstrap": round(_peak_rss_mb(), 1),
        }
    if check_sklearn:
        # Untimed: the fast ROC must equal sklearn's roc_curve on the full cross scores.
        from sklearn.metrics import roc_curve as sk_roc

        sc = curves.pair_scores["cross"]
        fast = roc_curve(sc, meta.pair_labels)
        fpr, tpr, thr = sk_roc(meta.pair_labels, sc)
        out["fast_roc_equals_sklearn"] = bool(
            np.array_equal(fast.fpr, fpr) and np.array_equal(fast.tpr, tpr)
            and np.array_equal(fast.thresholds, thr)
        )
    return out


def run_public(scale: float, seed: int, fraction: float) -> dict[str, Any]:
    """Time the public algorithm for self_old, self_new and cross (1:1 and 1:N)."""
    from sklearn.metrics import roc_curve as sk_roc

    from unibct_ray.metrics.verification import FARS, RocCurve, rate_key, tar_from_roc

    meta, old, new, gen = synthetic_ijbc(scale, seed)
    rss_data = _rss_now_mb()
    fars = list(FARS)
    feats = {"old": old, "new": new}
    labels = meta.pair_labels
    stage: dict[str, float] = {}
    results: dict[str, Any] = {}
    same_rule: dict[str, Any] = {}
    extrapolated = 0.0
    c0 = _cpu_s()
    t_all = time.perf_counter()
    for test, (e, v) in {"self_old": ("old", "old"), "self_new": ("new", "new"),
                         "cross": ("old", "new")}.items():
        ts = time.perf_counter()
        pooled = {}
        for name in dict.fromkeys((e, v)):
            img = feats[name] + 0  # the script's "emb + flip" input, copied
            img = img * meta.scores[:, np.newaxis]
            pooled[name] = public_pool_templates(img, meta.templates, meta.medias)
        stage[f"{test}/pool"] = time.perf_counter() - ts
        tp = time.perf_counter()
        ids = pooled[e][1]
        scores, done = public_pair_scores(pooled[e][0], pooled[v][0], ids, meta.pairs,
                                          fraction=fraction)
        t_pairs = time.perf_counter() - tp
        n_batches = math.ceil(meta.pairs.shape[0] / 100_000)
        if done < n_batches:
            # Untimed remainder so that the ROC sees every pair; time scaled linearly.
            from unibct_ray.metrics.verification import pair_scores

            rest = slice(done * 100_000, None)
            scores[rest] = pair_scores(ids, pooled[e][0].astype(np.float32),
                                       pooled[v][0].astype(np.float32), meta.pairs[rest])
            full_pairs = t_pairs * n_batches / done
            extrapolated += full_pairs - t_pairs
            t_pairs = full_pairs
        stage[f"{test}/pairs"] = t_pairs
        tr = time.perf_counter()
        fpr, tpr, thr = sk_roc(labels, scores)
        tars = public_tar(fpr, tpr, fars)
        stage[f"{test}/roc"] = time.perf_counter() - tr
        ti = time.perf_counter()
        rows = {nm: np.searchsorted(ids, getattr(meta, nm).templates)
                for nm in ("gallery1", "gallery2", "probes")}
        ident = public_identification(
            [pooled[e][0][rows["gallery1"]], pooled[e][0][rows["gallery2"]]],
            [meta.gallery1.subjects, meta.gallery2.subjects],
            pooled[v][0][rows["probes"]], meta.probes.subjects,
        )
        stage[f"{test}/identification"] = time.perf_counter() - ti
        results[test] = {"verification": dict(zip((rate_key(f) for f in fars), tars)),
                         "identification": ident}
        # Untimed: the same ROC under our tie rule, to compare like with like.
        same_rule[test] = tar_from_roc(RocCurve(fpr, tpr, thr, 1.0, 1.0), fars)
    total = time.perf_counter() - t_all + extrapolated
    cpu = _cpu_s() - c0
    return {
        "seconds": round(total, 3),
        "cpu_seconds_measured": round(cpu, 3),
        "measured_seconds": round(total - extrapolated, 3),
        "extrapolated_seconds": round(extrapolated, 3),
        "pair_fraction_timed": fraction,
        "stage_seconds": {k: round(x, 3) for k, x in stage.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_data_mb": round(rss_data, 1),
        "generation_seconds": {k: round(x, 2) for k, x in gen.items()},
        "results": results,
        "verification_with_our_tie_rule": same_rule,
    }


def run_cli(scale: float, seed: int) -> dict[str, Any]:
    """Time ``unibct-ray eval`` on files written here: cold (meta parsed) and warm (meta cached)."""
    meta, old, new, _ = synthetic_ijbc(scale, seed)
    with tempfile.TemporaryDirectory(prefix="unibct-bench-eval-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_ijbc_folder(meta, root, seed)
        np.save(root / "old.npy", old)
        np.save(root / "new.npy", new)
        write_s = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in (root / "IJBC" / "meta").iterdir()}
        del meta, old, new  # the CLI reads the files; this process's copy would only crowd it
        cache = root / "cache"
        runs: dict[str, Any] = {}
        for name in ("cold", "warm"):
            cmd = [sys.executable, "-m", "unibct_ray.cli", "eval", "--ijbc", str(root),
                   "--old-features", str(root / "old.npy"), "--new-features", str(root / "new.npy"),
                   "--out", str(root / f"out-{name}"), "--cache-dir", str(cache), "--bootstrap", "0"]
            load = os.getloadavg()[0]
            with open(root / f"stderr-{name}.txt", "w+b") as err:
                t = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=os.environ.copy())
                # wait4: this child's own peak RSS (RUSAGE_CHILDREN would mix in earlier runs).
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"unibct-ray eval ({name}) failed with {code}:\n{tail}")
            report = json.loads((root / f"out-{name}" / "report.json").read_text())
            runs[name] = {
                "seconds": round(wall, 3),
                "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
                "loadavg_1m_start": round(load, 2),
                "verification": report["verification"],
                "identification": report["identification"],
                "shards": report.get("protocol", {}).get("shards"),
            }
        return {"command": "unibct-ray eval --ijbc ROOT --old-features F --new-features G --out O "
                           "--cache-dir C --bootstrap 0",
                "meta_file_bytes": sizes, "write_files_seconds": round(write_s, 2), **runs}


def _max_diff(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    diffs = [abs(a[t][k] - b[t][k]) for t in a for k in a[t]
             if a[t][k] is not None and b[t].get(k) is not None]
    return float(max(diffs)) if diffs else float("nan")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="full", choices=sorted(SCALES),
                    help="full IJB-C sizes, small (x0.1, pairs x0.01) or tiny (x0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--public-fraction", type=float, default=1.0,
                    help="fraction of the public side's pair batches to time (rest extrapolated)")
    p.add_argument("--bootstrap-n", type=int, default=0,
                    help="also time a subject bootstrap of N replicates on our side")
    p.add_argument("--no-public", action="store_true", help="time our side only")
    p.add_argument("--no-cli", action="store_true",
                   help="skip the end-to-end `unibct-ray eval` runs (they write ~2 GB of files at full scale)")
    p.add_argument("--side", choices=("ours", "public", "cli"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Both sides in subprocesses (each its own peak memory); ``--side`` runs one and prints its
    JSON on one line for the parent."""
    scale = SCALES[args.scale]
    if args.side == "ours":
        print(json.dumps(run_ours(scale, args.seed, args.bootstrap_n, args.scale != "tiny")))
        return None
    if args.side == "public":
        print(json.dumps(run_public(scale, args.seed, args.public_fraction)))
        return None
    if args.side == "cli":
        print(json.dumps(run_cli(scale, args.seed)))
        return None

    def side(name: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "unibct_ray.bench.eval", "--side", name,
               "--scale", args.scale, "--seed", str(args.seed),
               "--public-fraction", str(args.public_fraction),
               "--bootstrap-n", str(args.bootstrap_n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            raise RuntimeError(f"bench side {name} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    load0 = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    ours = side("ours")
    result: dict[str, Any] = {"scale": args.scale, "cpu_count": os.cpu_count(),
                              "loadavg_1m_start": round(load0, 2), "ours": ours}
    cli = None if args.no_cli else side("cli")
    if cli is not None:
        result["cli"] = cli
        result["agreement_cli_vs_in_process"] = {
            run: max(_max_diff(ours["verification"], cli[run]["verification"]),
                     _max_diff(ours["identification"], cli[run]["identification"]))
            for run in ("cold", "warm")}
        for run in ("cold", "warm"):  # compared above; the in-process side prints the values
            del cli[run]["verification"], cli[run]["identification"]
    if not args.no_public:
        pub = side("public")
        result["public"] = pub
        result["speedup"] = round(pub["seconds"] / ours["seconds"], 1)
        if cli is not None:
            # What a user gets from the command line, against the same public run.
            result["speedup_cli_cold"] = round(pub["seconds"] / cli["cold"]["seconds"], 1)
            result["speedup_cli_warm"] = round(pub["seconds"] / cli["warm"]["seconds"], 1)
        if pub["extrapolated_seconds"] == 0:
            result["speedup_cpu_time"] = round(pub["cpu_seconds_measured"] / ours["cpu_seconds"], 1)
        pub_v = {t: r["verification"] for t, r in pub["results"].items()}
        pub_i = {t: r["identification"] for t, r in pub["results"].items()}
        result["agreement"] = {
            "max_abs_diff_tar_public_tie_rule": _max_diff(ours["verification"], pub_v),
            "max_abs_diff_tar_same_tie_rule": _max_diff(
                ours["verification"], pub["verification_with_our_tie_rule"]),
            "max_abs_diff_identification": _max_diff(ours["identification"], pub_i),
        }
        if pub["extrapolated_seconds"] > 0:
            result["note"] = (
                f"public pair scoring timed on {pub['pair_fraction_timed']:.0%} of the pair "
                f"batches and extrapolated linearly (+{pub['extrapolated_seconds']:.0f} s)"
            )
    result["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return result


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("eval", __doc__, add_arguments, run)
