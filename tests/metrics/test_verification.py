"""1:1 verification: pair scores vs a per-pair loop, ROC vs sklearn, TAR@FAR by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve

from unibct_ray.metrics import verification as vf
from unibct_ray.metrics.verification import (
    FARS,
    PairIndex,
    SortedPairs,
    pair_scores,
    rate_key,
    roc_curve,
    tar_at_far,
    tar_from_roc,
    verify,
)


def loop_pair_scores(ids, fe, fv, pairs):
    row = {int(t): i for i, t in enumerate(ids)}
    return np.array([float(np.dot(fe[row[int(a)]], fv[row[int(b)]])) for a, b in pairs])


def loop_tar(fpr, tpr, far):
    """Nearest FPR, highest TPR among equally near points (written as a plain loop)."""
    best, best_d = None, None
    for f, t in zip(fpr, tpr):
        d = abs(f - far)
        if best_d is None or d < best_d or (d == best_d and t > best):
            best, best_d = t, d
    return best


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def templates():
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 60, replace=False))  # non-contiguous ids
    fe = unit(rng.standard_normal((60, 8)))
    fv = unit(rng.standard_normal((60, 8)))
    return rng, ids, fe, fv


@pytest.mark.parametrize("dense_factor,batch", [(10**9, 1 << 25), (10**9, 64), (0, 64)])
def test_pair_scores_match_loop(templates, monkeypatch, dense_factor, batch):
    rng, ids, fe, fv = templates
    monkeypatch.setattr(vf, "_DENSE_FACTOR", dense_factor)  # GEMM grid vs gather path
    pairs = np.stack([rng.choice(ids[:20], 500), rng.choice(ids[15:], 500)], 1)
    got = pair_scores(ids, fe, fv, pairs, batch=batch)
    np.testing.assert_allclose(got, loop_pair_scores(ids, fe, fv, pairs), atol=1e-6)
    assert got.dtype == np.float32
    # enrolment side is column 0: swapping the matrices changes the scores
    swapped = pair_scores(ids, fv, fe, pairs, batch=batch)
    np.testing.assert_allclose(swapped, loop_pair_scores(ids, fv, fe, pairs), atol=1e-6)


def test_pair_index_reuse_and_errors(templates):
    rng, ids, fe, fv = templates
    pairs = np.stack([rng.choice(ids, 50), rng.choice(ids, 50)], 1)
    idx = PairIndex.build(ids, pairs)
    np.testing.assert_array_equal(pair_scores(ids, fe, fv, pairs, index=idx),
                                  pair_scores(ids, fe, fv, pairs))
    bad = pairs.copy()
    bad[7, 1] = 10_001
    with pytest.raises(ValueError, match=r"pairs\[:, 1\]: template 10001 \(entry 7\)"):
        pair_scores(ids, fe, fv, bad)
    with pytest.raises(ValueError, match="dim"):
        pair_scores(ids, fe, fv[:, :4], pairs)
    assert pair_scores(ids, fe, fv, np.zeros((0, 2), int)).shape == (0,)


def test_rate_key():
    assert [rate_key(f) for f in FARS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    assert rate_key(0.05) == "5e-2" and rate_key(1.5e-3) == "1.5e-3"


@pytest.mark.parametrize("seed", range(6))
def test_fast_roc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 3000))
    labels = (rng.random(m) < rng.uniform(0.05, 0.6)).astype(np.int8)
    labels[0], labels[1] = 1, 0
    scores = rng.standard_normal(m) + labels
    if seed % 2:
        scores = np.round(scores, 1)  # heavy ties, mixed labels inside a tie
    scores = scores.astype(np.float32 if seed % 3 else np.float64)
    fpr, tpr, thr = sk_roc_curve(labels, scores)
    roc = roc_curve(scores, labels)
    np.testing.assert_array_equal(roc.fpr, fpr)
    np.testing.assert_array_equal(roc.tpr, tpr)
    np.testing.assert_array_equal(roc.thresholds, thr)
    sk = roc_curve(scores, labels, backend="sklearn")
    np.testing.assert_array_equal(sk.fpr, fpr)
    for far in (1e-3, 0.01, 0.1, 0.5):
        key = rate_key(far)
        assert tar_from_roc(roc, [far])[key] == loop_tar(fpr, tpr, far)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_roc_equals_sklearn_and_duplication(seed):
    rng = np.random.default_rng(100 + seed)
    m = 400
    labels = (rng.random(m) < 0.3).astype(np.int8)
    scores = np.round(rng.standard_normal(m) + labels, 1).astype(np.float32)
    clusters = rng.integers(0, 25, m)
    counts = rng.integers(0, 3, 25)  # zeros drop whole clusters, as a bootstrap does
    sp = SortedPairs(scores, labels, clusters)
    roc = sp.roc(counts)
    w = counts[clusters]
    fpr, tpr, thr = sk_roc_curve(labels, scores, sample_weight=w)
    np.testing.assert_array_equal(roc.fpr, fpr)
    np.testing.assert_array_equal(roc.tpr, tpr)
    np.testing.assert_array_equal(roc.thresholds, thr)
    rep = np.repeat(np.arange(m), w)  # weights == duplicated pairs
    fpr2, tpr2, thr2 = sk_roc_curve(labels[rep], scores[rep])
    np.testing.assert_array_equal(roc.fpr, fpr2)
    np.testing.assert_array_equal(roc.tpr, tpr2)
    unweighted = sp.roc(None)
    np.testing.assert_array_equal(unweighted.fpr, roc_curve(scores, labels).fpr)


def test_tar_at_far_hand_computed():
    # genuine 0.9, 0.8, 0.8, 0.3; impostors 0.85 0.7 0.6 0.5 0.4 0.35 0.2 0.1 0.05 0.0
    gen = [0.9, 0.8, 0.8, 0.3]
    imp = [0.85, 0.7, 0.6, 0.5, 0.4, 0.35, 0.2, 0.1, 0.05, 0.0]
    scores = np.array(gen + imp)
    labels = np.array([1] * 4 + [0] * 10)
    res = verify(scores, labels, fars=(1e-6, 0.1, 0.3))
    # after sklearn's drop_intermediate: FPR 0 0 .1 .1 .6 .6 1, TPR 0 .25 .25 .75 .75 1 1
    np.testing.assert_allclose(res.roc.fpr, [0, 0, 0.1, 0.1, 0.6, 0.6, 1.0])
    np.testing.assert_allclose(res.roc.tpr, [0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0])
    # FAR 1e-6: nearest FPR 0 holds TPR 0 and 0.25 -> the higher; FAR 0.1: 0.25 and 0.75
    assert res.tar == {"1e-6": 0.25, "1e-1": 0.75, "3e-1": 0.75}
    assert tar_at_far(scores, labels, fars=(0.1,)) == {"1e-1": 0.75}


def test_undefined_tar_is_nan_with_note():
    res = verify(np.array([0.1, 0.2]), np.array([0, 0]))
    assert all(np.isnan(v) for v in res.tar.values())
    assert any("no genuine" in n for n in res.notes)
    res = verify(np.array([0.1, 0.2]), np.array([1, 1]))
    assert all(np.isnan(v) for v in res.tar.values()) and any("no impostor" in n for n in res.notes)
    assert list(verify(np.zeros(0), np.zeros(0)).tar) == [rate_key(f) for f in FARS]


def test_bad_inputs():
    with pytest.raises(ValueError, match="not finite"):
        roc_curve(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels\\[1\\] = 2"):
        roc_curve(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="backend"):
        roc_curve(np.array([0.1, 0.2]), np.array([0, 1]), backend="bogus")


@pytest.mark.parametrize("seed", range(8))
def test_roc_head_gives_the_same_tar(seed):
    rng = np.random.default_rng(200 + seed)
    m = int(rng.integers(500, 5000))
    labels = (rng.random(m) < 0.05).astype(np.int8)
    scores = rng.standard_normal(m) + 2 * labels
    if seed % 2:
        scores = np.round(scores, 2)  # ties, vertical runs
    clusters = rng.integers(0, 40, m)
    sp = SortedPairs(scores.astype(np.float32), labels, clusters)
    fars = (1e-4, 1e-3, 1e-2, 0.05, 0.1)
    for counts in (None, rng.integers(0, 3, 40), rng.integers(0, 2, 40)):
        full = sp.roc(counts)
        head = sp.roc(counts, max_fpr=0.1)
        assert head.fpr.size <= full.fpr.size
        np.testing.assert_array_equal(head.fpr, full.fpr[: head.fpr.size])
        np.testing.assert_array_equal(head.tpr, full.tpr[: head.tpr.size])
        assert tar_from_roc(head, fars) == tar_from_roc(full, fars)


@pytest.mark.parametrize("seed", range(10))
def test_fast_roc_head_is_a_prefix_of_sklearns_curve(seed):
    """roc_curve(max_fpr=f) keeps every point of sklearn's curve up to past FPR 2f and
    nothing else, so TAR at FAR <= f is unchanged; heavy ties (mixed labels inside a tie,
    long collinear runs) included, and a head that cannot be cut falls back to the whole
    curve."""
    rng = np.random.default_rng(300 + seed)
    m = int(rng.integers(2000, 20000))
    labels = (rng.random(m) < rng.uniform(0.002, 0.05)).astype(np.int8)
    labels[:2] = (1, 0)
    scores = rng.standard_normal(m) + 2.5 * labels
    if seed % 3 == 1:
        scores = np.round(scores, 1)  # big tie groups
    if seed % 3 == 2:
        scores = np.round(scores, 2)
    scores = scores.astype(np.float32)
    fpr, tpr, thr = sk_roc_curve(labels, scores)
    for f in (1e-3, 1e-2, 0.05, 0.1):
        head = roc_curve(scores, labels, max_fpr=f)
        n = head.fpr.size
        np.testing.assert_array_equal(head.fpr, fpr[:n])
        np.testing.assert_array_equal(head.tpr, tpr[:n])
        np.testing.assert_array_equal(head.thresholds, thr[:n])
        assert head.fpr[-1] > 2 * f or n == fpr.size
        assert head.n_impostor == (labels == 0).sum() and head.n_genuine == labels.sum()
        fars = [x for x in (1e-4, 1e-3, 1e-2, 0.05, 0.1) if x <= f]
        assert tar_from_roc(head, fars) == {rate_key(x): loop_tar(fpr, tpr, x) for x in fars}
    # A head of half the impostors or more is not worth cutting: the whole curve comes back.
    np.testing.assert_array_equal(roc_curve(scores, labels, max_fpr=0.3).fpr, fpr)
    with pytest.raises(ValueError, match="beyond head_far"):
        verify(scores, labels, (1e-3, 0.1), head_far=0.01)


def test_fast_roc_head_is_much_shorter_at_scale():
    rng = np.random.default_rng(7)
    m = 200_000
    labels = (rng.random(m) < 0.002).astype(np.int8)
    scores = (rng.standard_normal(m) + 3 * labels).astype(np.float32)
    head = roc_curve(scores, labels, max_fpr=0.01)
    full = roc_curve(scores, labels)
    assert 2 * 0.01 < head.fpr[-1] < 0.05 and full.fpr[-1] == 1.0  # cut just past FPR 0.02
