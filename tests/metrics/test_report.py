"""Report schema, files and the evaluate_features glue (validation, paths that must agree)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unibct_ray.bench.eval import (
    FULL,
    public_pair_scores,
    public_pool_templates,
    synthetic_ijbc,
)
from unibct_ray.metrics.evaluate import evaluate_features
from unibct_ray.metrics.knn import ShardedKNN, faiss_knn
from unibct_ray.metrics.report import build_report, report_markdown, write_report
from unibct_ray.metrics.templates import pool_templates
from unibct_ray.metrics.verification import pair_scores

FAR_KEYS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
ID_KEYS = ["top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"]
TESTS = ["self_old", "self_new", "cross"]


@pytest.fixture(scope="module")
def data():
    meta, old, new, _ = synthetic_ijbc(0.01, seed=2, dim=32, impostor_pairs=5000)
    return meta, old, new


@pytest.fixture(scope="module")
def evaluated(data):
    meta, old, new = data
    return evaluate_features(meta, old, new)


def test_schema_exact(evaluated):
    report, curves = evaluated
    assert {"verification", "identification", "compatible", "compatible_rule", "difference",
            "protocol"} <= set(report)
    assert list(report["verification"]) == TESTS and list(report["identification"]) == TESTS
    for t in TESTS:
        assert list(report["verification"][t]) == FAR_KEYS
        assert list(report["identification"][t]) == ID_KEYS
        assert all(isinstance(v, float) for v in report["verification"][t].values())
    assert isinstance(report["compatible"], bool)
    assert "bootstrap disabled" in report["compatible_rule"]
    assert report["compatible"] == (report["verification"]["cross"]["1e-4"]
                                    > report["verification"]["self_old"]["1e-4"])
    assert set(report["difference"]) >= {"value", "ci95"} and report["difference"]["ci95"] is None
    proto = report["protocol"]
    for key in ("criterion_far", "flip", "detector_score_weighting", "bootstrap", "seed", "knn"):
        assert key in proto
    assert proto["criterion_far"] == 1e-4 and proto["bootstrap"] == 0
    json.dumps(report, allow_nan=False)  # JSON-ready as returned


def test_write_report_files(evaluated, tmp_path):
    from matplotlib.image import imread

    report, curves = evaluated
    paths = write_report(report, tmp_path / "out", curves.roc, curves.cmc)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["cmc.png", "report.json", "report.md", "roc.png"]  # no temporary files left
    loaded = json.loads(paths["json"].read_text())
    assert loaded["verification"] == report["verification"]
    md = paths["md"].read_text()
    verdict = "yes" if report["compatible"] else "no"
    assert f"Compatible: {verdict} at FAR=1e-4" in md
    assert "| self_old |" in md and "tpir@fpir=1e-2" in md
    for name in ("roc", "cmc"):
        raw = paths[name].read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(paths[name])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_single_model_only_self_and_null_compatible(data):
    meta, old, new = data
    report, curves = evaluate_features(meta, None, new)
    assert list(report["verification"]) == ["self_new"]
    assert list(report["identification"]) == ["self_new"]
    assert report["compatible"] is None and "needs both" in report["compatible_rule"]
    assert "Compatible: n/a at FAR=1e-4" in report_markdown(report)


def test_nan_is_null_with_note(tmp_path):
    ver = {"self_old": dict.fromkeys(FAR_KEYS, 0.5), "cross": dict.fromkeys(FAR_KEYS, 0.6)}
    ver["self_old"]["1e-6"] = float("nan")
    idn = {t: dict.fromkeys(ID_KEYS, 0.9) for t in ver}
    report = build_report(ver, idn)
    assert report["verification"]["self_old"]["1e-6"] is None
    assert any("self_old.1e-6" in n for n in report["notes"])
    assert report["compatible"] is True
    write_report(report, tmp_path, {}, {})
    assert json.loads((tmp_path / "report.json").read_text())["verification"]["self_old"]["1e-6"] is None
    ver["cross"]["1e-4"] = float("nan")
    undecided = build_report(ver, idn)
    assert undecided["compatible"] is None and "undefined" in undecided["compatible_rule"]
    with pytest.raises(ValueError, match="unknown verification"):
        build_report({"selfold": {}}, {})


def test_plot_process_draws_the_same_pngs_and_a_dead_one_is_replaced(evaluated, tmp_path):
    from unibct_ray.metrics import report as rep_mod

    report, curves = evaluated
    here = write_report(report, tmp_path / "here", curves.roc, curves.cmc)
    rep_mod.start_plot_process()
    try:
        child_pid = rep_mod._PLOTTER.proc.pid
        there = write_report(report, tmp_path / "there", curves.roc, curves.cmc)
        assert rep_mod._PLOTTER is not None and rep_mod._PLOTTER.proc.pid == child_pid  # it drew them
        for name in ("roc", "cmc"):
            assert there[name].read_bytes() == here[name].read_bytes(), name
        rep_mod._PLOTTER.proc.kill()
        rep_mod._PLOTTER.proc.wait()
        again = write_report(report, tmp_path / "again", curves.roc, curves.cmc)
        assert rep_mod._PLOTTER is None  # given up on; drawn in this process
        for name in ("roc", "cmc"):
            assert again[name].read_bytes() == here[name].read_bytes(), name
    finally:
        rep_mod.stop_plot_process()


def test_backends_and_paths_agree(data, evaluated):
    meta, old, new = data
    ref = evaluated[0]
    assert ref["protocol"]["score_grid_shared"] is True
    for kwargs in ({"reuse_scores": False}, {"knn": faiss_knn("flat")},
                   {"knn": ShardedKNN(faiss_knn("flat"), 3)}, {"roc_backend": "sklearn"}):
        rep, _ = evaluate_features(meta, old, new, **kwargs)
        assert rep["protocol"]["score_grid_shared"] is False or "roc_backend" in kwargs
        for section in ("verification", "identification"):
            for t in TESTS:
                assert rep[section][t] == pytest.approx(ref[section][t], abs=2e-3), (kwargs, section, t)


def test_shared_grid_with_odd_galleries(data):
    """The shared grid orders its rows [G1 | G2 | other enrolment templates]: galleries that
    overlap, enrolment templates in no gallery and a probe subset must give what the
    separate pair-score + brute-force-kNN path gives."""
    import dataclasses

    from unibct_ray.data.ijbc import TemplateSubjects

    meta, old, new = data
    g1, g2, pr = meta.gallery1, meta.gallery2, meta.probes
    keep1 = np.arange(len(g1)) % 3 != 0                       # a third of G1 in no gallery
    shared = np.r_[g2.templates, g1.templates[:2]]            # two G1 templates also in G2
    order = np.argsort(shared)
    odd = dataclasses.replace(
        meta,
        gallery1=TemplateSubjects(g1.templates[keep1], g1.subjects[keep1]),
        gallery2=TemplateSubjects(shared[order], np.r_[g2.subjects, g1.subjects[:2]][order]),
        probes=TemplateSubjects(pr.templates[::2], pr.subjects[::2]),  # every other probe
    )
    ref, _ = evaluate_features(odd, old, new, reuse_scores=False)
    assert ref["protocol"]["score_grid_shared"] is False
    got, c2 = evaluate_features(odd, old, new)
    assert got["protocol"]["score_grid_shared"] is True
    for t in TESTS:
        for section in ("verification", "identification"):
            assert got[section][t] == pytest.approx(ref[section][t], abs=1e-9), (section, t)
    # The pair scores themselves against an independent dot product per pair.
    _, enr = pool_templates(old, meta.templates, meta.medias, meta.scores)
    ids, ver = pool_templates(new, meta.templates, meta.medias, meta.scores)
    a, b = np.searchsorted(ids, meta.pairs[:, 0]), np.searchsorted(ids, meta.pairs[:, 1])
    np.testing.assert_allclose(c2.pair_scores["cross"], np.einsum("ij,ij->i", enr[a], ver[b]),
                               atol=1e-5)


def test_flip_tuple_equals_precomputed_sum(data, evaluated):
    meta, old, new = data
    rng = np.random.default_rng(0)
    half = rng.standard_normal(old.shape).astype(np.float32)
    rep, _ = evaluate_features(meta, (old - half, half), new)
    for t in TESTS:
        assert rep["verification"][t] == pytest.approx(evaluated[0]["verification"][t], abs=2e-3)
    # Each model's own line: the old one came as a pair, the new one precomputed.
    assert rep["protocol"]["flip"] == ("old: emb + emb(flipped); "
                                       "new: precomputed per-image features (taken as emb + emb(flipped))")


def test_input_validation(data):
    meta, old, new = data
    with pytest.raises(ValueError, match=r"old features have \d+ rows but the IJB-C meta lists"):
        evaluate_features(meta, old[:-1], new)
    with pytest.raises(ValueError, match="old features have dim 32, new features dim 16"):
        evaluate_features(meta, old, new[:, :16])
    bad = new.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="new features: row 5"):
        evaluate_features(meta, old, bad)
    bad[5, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_features(meta, None, bad)
    with pytest.raises(ValueError, match="give old_feats, new_feats or both"):
        evaluate_features(meta, None, None)
    with pytest.raises(ValueError, match="emb_flip"):
        evaluate_features(meta, (old, old[:, :3]), None)


def test_bench_generator_and_public_side(data):
    meta, old, new = data
    # sizes: full scale is exact, smaller scales shrink in proportion
    assert FULL["templates"] == FULL["g1"] + FULL["g2"] + FULL["probes"]
    assert len(meta.gallery1) + len(meta.gallery2) + len(meta.probes) == np.unique(meta.templates).size
    assert int(meta.pair_labels.sum()) == round(FULL["genuine"] * 0.01)
    assert np.unique(meta.pairs, axis=0).shape[0] == meta.n_pairs  # no repeated pair
    # the public algorithm written in the bench agrees with ours
    img = old * meta.scores[:, None]
    pub, pub_ids = public_pool_templates(img, meta.templates, meta.medias)
    ids, ours = pool_templates(old, meta.templates, meta.medias, meta.scores)
    np.testing.assert_array_equal(pub_ids, ids)
    np.testing.assert_allclose(pub, ours, atol=1e-5)
    s_pub, done = public_pair_scores(pub, pub, pub_ids, meta.pairs, batch=1000)
    assert done == math.ceil(meta.n_pairs / 1000)
    np.testing.assert_allclose(s_pub, pair_scores(ids, ours, ours, meta.pairs), atol=1e-5)


def test_knn_per_gallery_model(data, evaluated):
    """A mapping {"old": KNN, "new": KNN}: each 1:N test searches with the backend of its
    gallery model (self_old and cross: old; self_new: new)."""
    from unibct_ray.metrics.distractors import DistractorKNN
    from unibct_ray.metrics.knn import brute_force_knn

    meta, old, new = data
    ref = evaluated[0]
    # Distractors equal to copies of every gallery template of the new model: any search with
    # them gives a distractor at rank 1 of every probe, so top-1 drops to 0 - for self_new only.
    _, pooled = pool_templates(new, meta.templates, meta.medias, meta.scores)
    rep, _ = evaluate_features(meta, old, new, knn={"old": brute_force_knn, "new": DistractorKNN(
        brute_force_knn, pooled * (1 + 1e-3), embedded_by="the new model")})
    assert rep["protocol"]["score_grid_shared"] is False
    assert rep["identification"]["self_new"]["top1"] == 0.0 < ref["identification"]["self_new"]["top1"]
    for t in ("self_old", "cross"):
        assert rep["identification"][t] == pytest.approx(ref["identification"][t], abs=1e-9)
    assert "new galleries:" in rep["protocol"]["knn"] and "embedded by the new model" in rep["protocol"]["knn"]
    with pytest.raises(ValueError, match="no 'new' one"):
        evaluate_features(meta, old, new, knn={"old": brute_force_knn})
