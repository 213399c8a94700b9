"""`unibct-ray eval` on the synthetic IJB-C folder from features, through Ray FAISS shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unibct_ray.cli import main
from unibct_ray.data import ijbc
from unibct_ray.distributed.evaluate import flip_protocol
from unibct_ray.distributed.knn import RayShardedKNN
from unibct_ray.metrics.knn import brute_force_knn


@pytest.fixture(scope="module")
def ijbc_dir(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "synth"
    assert main(["data", "synth", "--out", str(out), "--identities", "2", "--images-per-identity", "2",
                 "--size", "32", "--eval-identities", "30", "--probes-per-identity", "2",
                 "--impostor-pairs", "800", "--no-progress"]) == 0
    return out


def features(meta, noise: float, seed: int, d: int = 16) -> np.ndarray:
    """Identity-structured features: subject centre + noise (old and new share centres)."""
    rng = np.random.default_rng(seed)
    subj = {}
    tid_to_subject = {}
    for ts in (meta.gallery1, meta.gallery2, meta.probes):
        tid_to_subject.update(zip(ts.templates.tolist(), ts.subjects.tolist()))
    out = np.zeros((len(meta.image_names), d), np.float32)
    for i, t in enumerate(meta.templates.tolist()):
        s = tid_to_subject[t]
        if s not in subj:
            subj[s] = np.random.default_rng(1000 + s).standard_normal(d)
        out[i] = subj[s] + noise * rng.standard_normal(d)
    return out


def test_eval_from_features(ijbc_dir, tmp_path, capsys):
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    np.save(tmp_path / "old.npy", features(meta, 1.5, 1))
    np.save(tmp_path / "new.npy", features(meta, 0.5, 2).astype(np.float16))  # float16 accepted
    out = tmp_path / "report"
    code = main(["eval", "--ijbc", str(ijbc_dir), "--old-features", str(tmp_path / "old.npy"),
                 "--new-features", str(tmp_path / "new.npy"), "--out", str(out), "--bootstrap", "40",
                 "--shards", "2", "--distractors", "50", "--distractor-features", str(tmp_path / "old.npy"),
                 "--new-distractor-features", str(tmp_path / "new.npy")])
    assert code == 0, capsys.readouterr().err
    # a line per phase, with counts and times, then the report line
    printed = capsys.readouterr().out.splitlines()
    phases = [line.split(" ")[1].rstrip(":") for line in printed if line.startswith("[eval] ")]
    assert phases == ["IJB-C", "Ray", "distractors", "distractors", "scoring", "metrics"], printed
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    assert f"{len(meta.image_names)} images, " in printed[0] and f"{len(meta.pair_labels)} 1:1 pairs" in printed[0]
    assert any(line.startswith("[eval] scoring self_old, self_new, cross: 1:1 over ") and "40 bootstrap" in line
               for line in printed)
    assert any(line.startswith("[eval] metrics in ") and "bootstrap" in line for line in printed)
    assert printed[-1].startswith("report: ")
    rep = json.loads((out / "report.json").read_text())
    for test in ("self_old", "self_new", "cross"):
        assert set(rep["verification"][test]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
        assert set(rep["identification"][test]) == {"top1", "top5", "top10", "tpir@fpir=1e-2", "tpir@fpir=1e-1"}
    # the less noisy new model, sharing the subject centres, beats the old one everywhere
    assert rep["verification"]["self_new"]["1e-2"] > rep["verification"]["self_old"]["1e-2"]
    assert rep["verification"]["cross"]["1e-1"] > rep["verification"]["self_old"]["1e-1"]
    assert isinstance(rep["compatible"], bool)
    assert rep["protocol"]["flip"] == "precomputed per-image features (taken as emb + emb(flipped))"
    for f in ("report.md", "roc.png", "cmc.png"):
        assert (out / f).stat().st_size > 0
    assert Image.open(out / "roc.png").size[0] > 100
    assert "Compatible:" in (out / "report.md").read_text()


def _ref_templates(meta, feats: np.ndarray) -> dict[int, np.ndarray]:
    """Template features by the protocol's definition, one template at a time (a plain loop):
    normalise(sum over media of mean over the media's images of score * feature)."""
    out = {}
    for t in np.unique(meta.templates):
        rows = np.flatnonzero(meta.templates == t)
        acc = np.zeros(feats.shape[1])
        for m in np.unique(meta.medias[rows]):
            r = rows[meta.medias[rows] == m]
            acc += (feats[r].astype(np.float64) * meta.scores[r, None]).mean(0)
        out[int(t)] = acc / np.linalg.norm(acc)
    return out


def _ref_top1(meta, feats: np.ndarray, distractors: np.ndarray) -> float:
    """Brute-force 1:N top-1 of one model: each gallery + the given distractors, every probe;
    (hits G1 + hits G2) / probes. A distractor at rank 1 is a miss."""
    tmpl = _ref_templates(meta, feats)
    dist = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    hits = 0
    for gal in (meta.gallery1, meta.gallery2):
        g = np.stack([tmpl[int(t)] for t in gal.templates])
        for t, subject in zip(meta.probes.templates.tolist(), meta.probes.subjects.tolist()):
            scores = np.concatenate([g @ tmpl[t], dist @ tmpl[t]])
            j = int(np.argmax(scores))
            hits += j < len(g) and int(gal.subjects[j]) == subject
    return hits / len(meta.probes)


def test_each_gallery_gets_distractors_of_its_own_model(ijbc_dir, tmp_path, capsys):
    """new = old @ R (R orthogonal): the new model is the old one in a rotated space, so with
    distractors embedded by the new model self_new must equal self_old and the brute-force
    reference; old-space distractors in the new gallery would give other figures."""
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    d = 16
    old = features(meta, 1.0, 1, d)
    rot, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((d, d)))
    new = (old @ rot).astype(np.float32)
    # Hard distractors: near the centres of the gallery subjects, so they take rank 1 often.
    rng = np.random.default_rng(7)
    subjects = np.unique(np.concatenate([meta.gallery1.subjects, meta.gallery2.subjects]))
    old_d = np.stack([np.random.default_rng(1000 + s).standard_normal(d) + 0.6 * rng.standard_normal(d)
                      for s in np.repeat(subjects, 2)]).astype(np.float32)
    new_d = (old_d @ rot).astype(np.float32)
    for name, arr in (("old", old), ("new", new), ("old_d", old_d), ("new_d", new_d)):
        np.save(tmp_path / f"{name}.npy", arr)
    n_d = len(old_d)
    base = ["eval", "--ijbc", str(ijbc_dir), "--old-features", str(tmp_path / "old.npy"),
            "--new-features", str(tmp_path / "new.npy"), "--bootstrap", "0", "--shards", "1",
            "--distractors", str(n_d), "--distractor-features", str(tmp_path / "old_d.npy")]

    # No new-model distractor embeddings: refused before any work, naming the flag.
    assert main([*base, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--new-distractor-features" in err and "self_new" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "r"
    assert main([*base, "--new-distractor-features", str(tmp_path / "new_d.npy"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    top1 = {t: rep["identification"][t]["top1"] for t in ("self_old", "self_new")}
    right = _ref_top1(meta, new, new_d)
    wrong = _ref_top1(meta, new, old_d)  # what appending the old model's distractors gives
    assert top1["self_new"] == pytest.approx(right, abs=1e-9)
    assert top1["self_old"] == pytest.approx(_ref_top1(meta, old, old_d), abs=1e-9)
    assert right == pytest.approx(top1["self_old"], abs=1e-9)  # rotation changes nothing
    assert wrong - right > 0.1, (wrong, right)  # the distractors matter, and in the right space only
    for test in ("self_old", "self_new"):
        assert rep["identification"][test] == pytest.approx(rep["identification"]["self_old"], abs=1e-9)
    emb = rep["protocol"]["distractor_embeddings"]
    assert emb["self_new"].startswith("new model") and "new_d.npy" in emb["self_new"]
    assert emb["self_old"].startswith("old model") and emb["cross"].startswith("old model")


def test_flip_protocol_says_how_each_model_was_embedded():
    ckpt = "emb(img) + emb(flipped img), embedded here from the checkpoint (5-point aligned crops)"
    feats = "precomputed per-image features (taken as emb + emb(flipped))"
    assert flip_protocol({"old": "checkpoint", "new": "checkpoint"}) == ckpt
    assert flip_protocol({"new": "features"}) == feats
    assert flip_protocol({"old": "features", "new": "checkpoint"}) == f"old: {feats}; new: {ckpt}"


def test_one_model_only(ijbc_dir, tmp_path):
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    np.save(tmp_path / "new.npy", features(meta, 0.5, 2))
    assert main(["eval", "--ijbc", str(ijbc_dir / "IJBC"), "--new-features", str(tmp_path / "new.npy"),
                 "--out", str(tmp_path / "r"), "--bootstrap", "0", "--shards", "1"]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(rep["verification"]) == {"self_new"} and rep["compatible"] is None


@pytest.mark.parametrize("mutate,needle", [
    (lambda a: a[:-1], "rows, but the IJB-C meta lists"),
    (lambda a: a[:, :8], "embedding size 8 differs"),
    (lambda a: np.where(np.arange(len(a))[:, None] == 3, np.nan, a).astype(np.float32), "row 3 holds NaN"),
    (lambda a: a.astype(np.float64), "must be float32 or float16"),
])
def test_bad_feature_files(ijbc_dir, tmp_path, capsys, mutate, needle):
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    good = features(meta, 1.0, 1)
    np.save(tmp_path / "old.npy", good)
    np.save(tmp_path / "new.npy", mutate(good))
    out = tmp_path / "r"
    code = main(["eval", "--ijbc", str(ijbc_dir), "--old-features", str(tmp_path / "old.npy"),
                 "--new-features", str(tmp_path / "new.npy"), "--out", str(out), "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "new.npy" in err and len(err.strip().splitlines()) == 1
    assert not (out / "report.json").exists()


def test_ray_shards_equal_one_index(ray_session):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((1001, 8)).astype(np.float32)
    gallery[500] = gallery[10]  # an exact tie across shards
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[[10, 3, 900]] + 0.01 * rng.standard_normal((3, 8)).astype(np.float32)
    s1, i1 = brute_force_knn(gallery, queries, 7)
    s2, i2 = RayShardedKNN(shards=3)(gallery, queries, 7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def test_ray_shards_kept_between_searches(ray_session):
    """Inside ``with knn:`` the shard actors serve several searches over different galleries
    (each loads its own slices) and end on leaving; every result equals brute force."""
    rng = np.random.default_rng(1)
    galleries = [rng.standard_normal((n, 8)).astype(np.float32) for n in (300, 41, 300)]
    queries = rng.standard_normal((20, 8)).astype(np.float32)
    knn = RayShardedKNN(shards=2)
    with knn:
        got = []
        for g in galleries:
            got.append(knn(g, queries, 5))
            actors = list(knn._pool[2])
            assert all(a is not None for a in actors)
            if len(got) > 1:
                assert actors == first_actors  # the same actors, not new ones
            first_actors = actors
    assert knn._pool is None  # actors and placement group released
    for g, (s, i) in zip(galleries, got):
        bs, bi = brute_force_knn(g, queries, 5)
        np.testing.assert_array_equal(i, bi)
        np.testing.assert_allclose(s, bs, rtol=1e-5, atol=1e-6)
    s, i = knn(galleries[1], queries, 5)  # outside the block: a call of its own, released after
    assert knn._pool is None
    np.testing.assert_array_equal(i, brute_force_knn(galleries[1], queries, 5)[1])


def test_gate_exits_3_unless_compatible(ijbc_dir, tmp_path, capsys):
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    np.save(tmp_path / "old.npy", features(meta, 1.5, 1))
    np.save(tmp_path / "better.npy", features(meta, 0.5, 2))  # same subject centres, less noise
    common = ["eval", "--ijbc", str(ijbc_dir), "--old-features", str(tmp_path / "old.npy"), "--shards", "1",
              "--criterion-far", "0.1", "--bootstrap", "0", "--gate"]
    # the old model against itself: cross == self_old, a difference of exactly 0 is not compatible
    code = main([*common, "--new-features", str(tmp_path / "old.npy"), "--out", str(tmp_path / "same")])
    last = capsys.readouterr().out.splitlines()[-1]
    assert code == 3, last
    assert last == ("gate: FAIL - not compatible at FAR=0.1: TAR(cross) - TAR(self_old) = +0.0000; "
                    "deploy only with a backfill of the gallery")
    assert json.loads((tmp_path / "same" / "report.json").read_text())["compatible"] is False  # written anyway
    code = main([*common, "--new-features", str(tmp_path / "better.npy"), "--out", str(tmp_path / "better")])
    last = capsys.readouterr().out.splitlines()[-1]
    rep = json.loads((tmp_path / "better" / "report.json").read_text())
    diff = rep["verification"]["cross"]["1e-1"] - rep["verification"]["self_old"]["1e-1"]
    assert diff > 0 and code == 0, last
    assert last.startswith("gate: PASS - the new model is compatible with the old gallery at FAR=0.1: ")
    assert f"= {diff:+.4f}" in last
    # without the flag the exit status does not depend on the verdict
    assert main([*common[:-1], "--new-features", str(tmp_path / "old.npy"), "--out", str(tmp_path / "nogate")]) == 0


def test_gate_verdict_lines():
    from unibct_ray.cli import gate_verdict

    rep = {"compatible": True, "difference": {"value": 0.0123, "ci95": [0.004, 0.02], "far": 1e-4}}
    assert gate_verdict(rep) == (0, "gate: PASS - the new model is compatible with the old gallery at FAR=0.0001: "
                                    "TAR(cross) - TAR(self_old) = +0.0123, 95% interval [+0.0040, +0.0200]")
    rep = {"compatible": None, "compatible_rule": "not applicable: needs both the old and the new model",
           "difference": {"value": None, "ci95": None, "far": 1e-4}}
    assert gate_verdict(rep) == (3, "gate: FAIL - compatibility undecided (not applicable: needs both the old "
                                    "and the new model)")


def test_models_matrix_from_the_command_line(ijbc_dir, tmp_path, capsys):
    """``--models``: three models, the matrix of every pair, the gate over all of them."""
    meta = ijbc.read_ijbc_meta(ijbc_dir)
    v1, v2 = features(meta, 1.5, 1), features(meta, 0.5, 2)
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((16, 16)))
    v3 = (v2 @ q).astype(np.float32)  # as good as v2, in another space
    for name, f in (("v1", v1), ("v2", v2), ("v3", v3)):
        np.save(tmp_path / f"{name}.npy", f)
    models = [f"{n}={tmp_path / n}.npy" for n in ("v1", "v2", "v3")]
    out = tmp_path / "m"
    code = main(["eval", "--ijbc", str(ijbc_dir), "--models", *models, "--out", str(out), "--bootstrap", "0",
                 "--criterion-far", "0.1", "--gate"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 3, printed
    assert printed[-1].startswith("gate: FAIL - not compatible at FAR=0.1: v3 -> v1, v3 -> v2;"), printed[-1]
    m = json.loads((out / "matrix.json").read_text())
    assert m["models"] == ["v1", "v2", "v3"] and m["pairs"] == [["v2", "v1"], ["v3", "v1"], ["v3", "v2"]]
    assert [c["compatible"] for c in m["cells"]] == [True, False, False]
    # v2 -> v1 is the pair evaluation of the single-pair command (old = gallery model)
    assert main(["eval", "--ijbc", str(ijbc_dir), "--old-features", str(tmp_path / "v1.npy"), "--new-features",
                 str(tmp_path / "v2.npy"), "--out", str(tmp_path / "pair"), "--bootstrap", "0",
                 "--criterion-far", "0.1"]) == 0
    pair = json.loads((tmp_path / "pair" / "report.json").read_text())
    assert m["cells"][0]["verification"] == pair["verification"]["cross"]
    assert m["self"]["v1"]["verification"] == pair["verification"]["self_old"]
    assert json.loads((out / "pairs" / "v2-vs-v1" / "report.json").read_text())["verification"] == pair["verification"]
    assert (out / "matrix.png").stat().st_size > 0 and "| v3 |" in (out / "matrix.md").read_text()
    capsys.readouterr()
    # --pairs adjacent with the gate: v2 -> v1 passes, v3 -> v2 fails; an existing matrix is kept
    assert main(["eval", "--ijbc", str(ijbc_dir), "--models", *models, "--out", str(out)]) == 2
    assert "matrix.json: already exists" in capsys.readouterr().err
    code = main(["eval", "--ijbc", str(ijbc_dir), "--models", *models[:2], "--out", str(tmp_path / "a"),
                 "--bootstrap", "0", "--criterion-far", "0.1", "--pairs", "latest", "--gate"])
    assert code == 0 and capsys.readouterr().out.splitlines()[-1] == "gate: PASS - all 1 pairs compatible at FAR=0.1"


@pytest.mark.parametrize("models, needle", [
    (["a=x.npy", "a=y.npy"], "given twice"),
    (["../up=x.npy"], "a model name is"),
    (["v1=missing.npy"], "not found"),
])
def test_models_bad_arguments(ijbc_dir, tmp_path, capsys, models, needle):
    code = main(["eval", "--ijbc", str(ijbc_dir), "--models", *models, "--out", str(tmp_path / "o")])
    assert code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
