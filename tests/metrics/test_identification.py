"""1:N identification against a per-probe loop of ARCHITECTURE §6, plus hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unibct_ray.bench.eval import public_identification
from unibct_ray.metrics.identification import (
    GalleryOutcome,
    TemplateSet,
    _threshold_index,
    identify,
    identify_galleries,
    metric_keys,
    outcome_from_scores,
    weighted_metrics,
)
from unibct_ray.metrics.knn import faiss_knn

KEYS = ["top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"]


def loop_identification(galleries, probes, ks=(1, 5, 10), fpirs=(1e-2, 1e-1)):
    """Per probe: scores, stable sort (ties -> lower gallery index), rank of the mate."""
    hits = {k: 0 for k in ks}
    tpir = {f: [] for f in fpirs}
    for g in galleries:
        mated_rows = []  # (rank1 correct, top1 score)
        nonmated = []
        for p_sub, p_feat in zip(probes.subjects, probes.feats):
            s = g.feats.astype(np.float64) @ p_feat.astype(np.float64)
            order = sorted(range(len(s)), key=lambda j: (-s[j], j))
            if p_sub in set(g.subjects.tolist()):
                rank = next(r + 1 for r, j in enumerate(order) if g.subjects[j] == p_sub)
                for k in ks:
                    hits[k] += rank <= k
                mated_rows.append((rank == 1, s[order[0]]))
            elif len(order):
                nonmated.append(s[order[0]])
        nonmated.sort(reverse=True)
        for f in fpirs:
            if not mated_rows or not nonmated:
                continue
            thr = nonmated[max(math.floor(len(nonmated) * f) - 1, 0)]
            tpir[f].append(sum(c and sc > thr for c, sc in mated_rows) / len(mated_rows))
    out = {f"top{k}": hits[k] / len(probes.ids) for k in ks}
    for f in fpirs:
        out[f"tpir@fpir={f:.0e}".replace("e-0", "e-")] = float(np.mean(tpir[f])) if tpir[f] else float("nan")
    return out


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_sets(seed=0, n_sub=30, n_probe=300, d=8, quantise=False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_sub, d))
    subj = np.arange(n_sub) + 500
    half = n_sub // 2
    # G1: one template per subject of the first half, one subject with two templates
    g1_sub = np.r_[subj[:half], subj[0]]
    g2_sub = subj[half:]
    p_idx = rng.integers(0, n_sub + 5, n_probe)  # some probe subjects in no gallery
    p_sub = np.where(p_idx < n_sub, subj[np.minimum(p_idx, n_sub - 1)], 9000 + p_idx)

    def feats(sub, noise):
        base = np.array([centres[s - 500] if s < 9000 else rng.standard_normal(d) for s in sub])
        x = unit(base + noise * rng.standard_normal(base.shape))
        return np.round(x * 2) / 2 if quantise else x  # quantised -> many exact ties

    gal = [TemplateSet(np.arange(len(s)) * 3 + 1 + 1000 * i, s, feats(s, 0.6))
           for i, s in enumerate((g1_sub, g2_sub))]
    probes = TemplateSet(np.arange(n_probe) * 7 + 11, p_sub, feats(p_sub, 0.9))
    return gal, probes


@pytest.mark.parametrize("seed,quantise", [(0, False), (1, True), (2, True)])
def test_matches_loop(seed, quantise):
    gal, probes = make_sets(seed, quantise=quantise)
    res = identify_galleries(gal, probes)
    ref = loop_identification(gal, probes)
    assert list(res.metrics) == KEYS == metric_keys()
    for k in KEYS:
        assert res.metrics[k] == pytest.approx(ref[k], abs=1e-12), k
    # CMC is the top-k curve
    assert res.cmc[0] == res.metrics["top1"] and res.cmc[9] == res.metrics["top10"]
    assert (np.diff(res.cmc) >= 0).all() and res.cmc.shape == (20,)


def test_public_bench_implementation_agrees():
    gal, probes = make_sets(3)
    ours = identify_galleries(gal, probes).metrics
    pub = public_identification([g.feats.astype(np.float64) for g in gal],
                                [g.subjects for g in gal], probes.feats.astype(np.float64),
                                probes.subjects)
    for k in KEYS:
        assert ours[k] == pytest.approx(pub[k]), k


def test_faiss_flat_backend_same_result():
    gal, probes = make_sets(4, quantise=True)
    a = identify_galleries(gal, probes).metrics
    b = identify_galleries(gal, probes, knn=faiss_knn("flat")).metrics
    assert a == b


def test_threshold_index_rule():
    assert _threshold_index(np.array([10]), 0.1)[0] == 0   # floor(1) - 1
    assert _threshold_index(np.array([30]), 0.1)[0] == 2
    assert _threshold_index(np.array([10]), 0.01)[0] == 0  # max(-1, 0)
    assert _threshold_index(np.array([7]), 0.1)[0] == 0
    assert _threshold_index(np.array([19593]), 0.01)[0] == 194
    assert _threshold_index(np.array([300]), 0.01)[0] == 2  # 300 * 0.01 is 3.0000000000000004


def outcome(mated, rank, top1, name="G"):
    return GalleryOutcome(name, np.array(mated, bool), np.array(rank), np.array(top1, np.float32),
                          20, 5)


def test_tpir_hand_computed():
    # 10 non-mated with max scores 0.1..1.0, 4 mated (3 rank-1 correct)
    nm = [i / 10 for i in range(1, 11)]
    o = outcome([False] * 10 + [True] * 4, [0] * 10 + [1, 1, 1, 2],
                nm + [0.95, 1.0, 1.05, 2.0])
    met, cmc, per, notes = weighted_metrics([o], fpirs=(0.1, 0.3))
    # FPIR 0.1: index max(1 - 1, 0) = 0 -> threshold 1.0 -> only 1.05 counts (2.0 is rank 2)
    assert per["G"]["threshold@fpir=1e-1"][0] == pytest.approx(1.0)
    assert met["tpir@fpir=1e-1"][0] == pytest.approx(1 / 4)
    # FPIR 0.3: index 2 -> threshold 0.8 -> 0.95, 1.0, 1.05 count
    assert per["G"]["threshold@fpir=3e-1"][0] == pytest.approx(0.8)
    assert met["tpir@fpir=3e-1"][0] == pytest.approx(3 / 4)
    # top-k denominator is every probe (14), not the mated ones
    assert met["top1"][0] == pytest.approx(3 / 14) and met["top5"][0] == pytest.approx(4 / 14)


def test_weights_equal_duplicated_probes():
    gal, probes = make_sets(5)
    outs = identify_galleries(gal, probes).outcomes
    rng = np.random.default_rng(0)
    w = rng.integers(0, 4, probes.ids.size)
    met, cmc, _, _ = weighted_metrics(outs, w[None, :])
    rep = np.repeat(np.arange(probes.ids.size), w)
    dup = [GalleryOutcome(o.name, o.mated[rep], o.rank[rep], o.top1[rep], o.max_rank, o.gallery_size)
           for o in outs]
    met2, cmc2, _, _ = weighted_metrics(dup)
    for k in KEYS:
        assert met[k][0] == pytest.approx(met2[k][0])
    np.testing.assert_allclose(cmc, cmc2)


def test_empty_gallery_and_no_mated_are_nan_with_notes():
    gal, probes = make_sets(6)
    empty = TemplateSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 8), np.float32))
    res = identify_galleries([gal[0], empty], probes)
    assert np.isfinite(res.metrics["top1"])
    assert math.isnan(res.per_gallery["G2"]["tpir@fpir=1e-2"])
    assert res.metrics["tpir@fpir=1e-2"] == res.per_gallery["G1"]["tpir@fpir=1e-2"]
    assert any("G2 is empty" in n for n in res.notes)
    assert any("mean over the galleries where it is defined" in n for n in res.notes)
    # only empty galleries: everything defined stays 0 hits, TPIR NaN, no crash
    res = identify_galleries([empty], probes)
    assert res.metrics["top1"] == 0.0 and math.isnan(res.metrics["tpir@fpir=1e-1"])
    # every probe mated: no non-mated probes -> threshold undefined
    mated_only = TemplateSet(probes.ids[:5], gal[0].subjects[:5], probes.feats[:5])
    res = identify_galleries([gal[0]], TemplateSet(mated_only.ids, mated_only.subjects, mated_only.feats))
    assert math.isnan(res.metrics["tpir@fpir=1e-1"])
    assert any("no non-mated" in n for n in res.notes)
    # no probes at all
    none = TemplateSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 8), np.float32))
    res = identify_galleries(gal, none)
    assert math.isnan(res.metrics["top1"]) and any("no probes" in n for n in res.notes)


def test_input_errors():
    gal, probes = make_sets(7)
    with pytest.raises(ValueError, match="TemplateSet"):
        TemplateSet(np.arange(3), np.arange(2), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="dim"):
        identify(gal[0].ids, gal[0].subjects, gal[0].feats, probes.ids, probes.subjects,
                 probes.feats[:, :4])
    with pytest.raises(ValueError, match="FPIR"):
        weighted_metrics(identify_galleries(gal, probes).outcomes, fpirs=(2.0,))


@pytest.mark.parametrize("seed,max_rank", [(8, 20), (9, 12), (10, 1)])
def test_dense_outcome_equals_knn_outcome(seed, max_rank):
    # quantised features: many exact ties; G1 holds a subject with two templates
    gal, probes = make_sets(seed, quantise=True)
    for g in gal:
        a = identify(g.ids, g.subjects, g.feats, probes.ids, probes.subjects, probes.feats,
                     max_rank=max_rank)
        b = outcome_from_scores(g.feats @ probes.feats.T, g.subjects, probes.subjects,
                                a.max_rank)  # identify searches max(ks, max_rank)
        np.testing.assert_array_equal(a.mated, b.mated)
        np.testing.assert_array_equal(a.rank, b.rank)
        np.testing.assert_array_equal(a.top1, b.top1)
    empty = outcome_from_scores(np.zeros((0, 4), np.float32), np.zeros(0, int), np.arange(4))
    assert not empty.mated.any() and np.isneginf(empty.top1).all()
