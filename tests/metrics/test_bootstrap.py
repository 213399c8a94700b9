"""Subject bootstrap: seeded, paired, contains the estimate, shrinks with more subjects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from unibct_ray.data.ijbc import IJBCMeta, TemplateSubjects
from unibct_ray.bench.eval import synthetic_ijbc
from unibct_ray.metrics.bootstrap import (
    enrolment_subjects,
    percentile_interval,
    subject_bootstrap,
    subject_counts,
)
from unibct_ray.metrics.evaluate import evaluate_features


@pytest.fixture(scope="module")
def data():
    # ~9k images, ~20k pairs, 70 subjects (64-d features keep it fast)
    meta, old, new, _ = synthetic_ijbc(0.02, seed=1, dim=64, impostor_pairs=20_000)
    return meta, old, new


@pytest.fixture(scope="module")
def boot_report(data):
    meta, old, new = data
    return evaluate_features(meta, old, new, bootstrap=200, seed=7)


def test_counts_seeded():
    a, b = subject_counts(50, 12, 3), subject_counts(50, 12, 3)
    np.testing.assert_array_equal(a, b)
    assert (a.sum(1) == 12).all() and a.shape == (50, 12)
    assert not np.array_equal(a, subject_counts(50, 12, 4))


def test_deterministic_for_a_seed(data, boot_report):
    meta, old, new = data
    again, _ = evaluate_features(meta, old, new, bootstrap=200, seed=7)
    strip = lambda b: {k: v for k, v in b.items() if k != "seconds"}  # noqa: E731
    assert strip(again["bootstrap"]) == strip(boot_report[0]["bootstrap"])
    other, _ = evaluate_features(meta, old, new, bootstrap=200, seed=8)
    assert other["bootstrap"]["verification"] != boot_report[0]["bootstrap"]["verification"]


def test_interval_contains_point_estimate(boot_report):
    report, curves = boot_report
    boot = report["bootstrap"]
    assert boot["n"] == 200 and boot["subjects"] == 70
    checked = 0
    for section in ("verification", "identification"):
        for test, vals in report[section].items():
            for key, v in vals.items():
                lo, hi = boot[section][test][key]
                assert lo - 1e-12 <= v <= hi + 1e-12, (section, test, key, v, lo, hi)
                checked += 1
    assert checked == 3 * 6 + 3 * 5
    lo, hi = report["difference"]["ci95"]
    assert lo <= report["difference"]["value"] <= hi


def test_difference_is_paired(boot_report):
    reps = boot_report[1].bootstrap.replicates
    np.testing.assert_array_equal(
        reps["difference"], reps["verification/cross/1e-4"] - reps["verification/self_old/1e-4"])


def _duplicate(meta: IJBCMeta, old, new, copies: int):
    """``copies`` disjoint copies of every subject, template, media and pair."""
    t_off, s_off, m_off = 10**7, 10**6, 10**8

    def rep(a, off):
        return np.concatenate([a + c * off for c in range(copies)])

    def ts(x: TemplateSubjects):
        return TemplateSubjects(rep(x.templates, t_off), rep(x.subjects, s_off))

    dup = dataclasses.replace(
        meta,
        image_names=meta.image_names * copies,
        templates=rep(meta.templates, t_off),
        medias=rep(meta.medias, m_off),
        landmarks=np.concatenate([meta.landmarks] * copies),
        scores=np.concatenate([meta.scores] * copies),
        pairs=rep(meta.pairs, t_off),
        pair_labels=np.concatenate([meta.pair_labels] * copies),
        gallery1=ts(meta.gallery1), gallery2=ts(meta.gallery2), probes=ts(meta.probes),
    )
    return dup, np.concatenate([old] * copies), np.concatenate([new] * copies)


def test_interval_shrinks_with_4x_subjects(data, boot_report):
    meta, old, new = data
    big, bold, bnew = _duplicate(meta, old, new, 4)
    report4, _ = evaluate_features(big, bold, bnew, bootstrap=200, seed=7)
    report1 = boot_report[0]
    # the point estimates barely move: the same scores four times over, except that a
    # larger float32 matrix product rounds some copies differently (new ROC points)
    for test, vals in report1["verification"].items():
        assert report4["verification"][test] == pytest.approx(vals, abs=0.02)
    width = lambda iv: iv[1] - iv[0]  # noqa: E731
    ratios = [width(report4["difference"]["ci95"]) / width(report1["difference"]["ci95"])]
    for section, test, key in (("verification", "cross", "1e-2"), ("verification", "self_old", "1e-1"),
                               ("identification", "cross", "top1"),
                               ("identification", "self_new", "tpir@fpir=1e-1")):
        ratios.append(width(report4["bootstrap"][section][test][key])
                      / width(report1["bootstrap"][section][test][key]))
    # 4x the subjects: intervals ~ 1/sqrt(4) = 0.5 as wide
    assert np.mean(ratios) < 0.7, ratios
    assert max(ratios) < 0.9, ratios


def test_enrolment_subjects_unmapped_are_own_clusters():
    subj, unmapped = enrolment_subjects(np.array([5, 6, 7, 6, 9]), np.array([5, 7, 5]),
                                        np.array([50, 70, 50]))
    assert unmapped == 3
    assert subj[0] == 50 and subj[2] == 70
    assert subj[1] == subj[3] and subj[1] != subj[4] and min(subj[1], subj[4]) > 70
    with pytest.raises(ValueError, match="two subjects"):
        enrolment_subjects(np.array([5]), np.array([5, 5]), np.array([1, 2]))


def test_disabled_and_errors(data):
    meta, old, new = data
    report, curves = evaluate_features(meta, old, new, bootstrap=0)
    assert curves.bootstrap is None and "bootstrap" not in report
    assert report["difference"]["ci95"] is None
    with pytest.raises(ValueError, match="n must be >= 1"):
        subject_bootstrap(0)
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        evaluate_features(meta, old, new, bootstrap=-1)
    assert percentile_interval(np.array([np.nan])) is None
    assert percentile_interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])
