"""The compatibility matrix of several models (``unibct_ray.metrics.matrix``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unibct_ray.bench.eval import synthetic_ijbc
from unibct_ray.metrics.evaluate import evaluate_features
from unibct_ray.metrics.matrix import evaluate_matrix, matrix_markdown, matrix_pairs, write_matrix

FAR = "1e-3"


@pytest.fixture(scope="module")
def three_models():
    """v1 (noisy), v2 (the same space, less noise: compatible with v1), v3 (v2 rotated by a
    random orthogonal matrix: as good as v2 on its own, in another space)."""
    meta, old, new, _ = synthetic_ijbc(0.01, seed=3, dim=16, impostor_pairs=4000)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 16)))
    v3 = (new @ q).astype(np.float32)
    return meta, {"v1": old, "v2": new, "v3": v3}


def test_pairs_by_rule():
    m = ["a", "b", "c", "d"]
    assert matrix_pairs(m) == [("b", "a"), ("c", "a"), ("c", "b"), ("d", "a"), ("d", "b"), ("d", "c")]
    assert matrix_pairs(m, "latest") == [("d", "a"), ("d", "b"), ("d", "c")]
    assert matrix_pairs(m, "adjacent") == [("b", "a"), ("c", "b"), ("d", "c")]
    assert matrix_pairs(["a"]) == []
    with pytest.raises(ValueError, match="distinct"):
        matrix_pairs(["a", "a"])
    with pytest.raises(ValueError, match="pairs must be one of"):
        matrix_pairs(m, "every")


def test_matrix_cells_follow_the_gallery_query_orientation(three_models):
    meta, feats = three_models
    matrix, runs = evaluate_matrix(meta, feats, ["v1", "v2", "v3"], criterion_far=1e-3)
    assert matrix["pairs"] == [["v2", "v1"], ["v3", "v1"], ["v3", "v2"]]
    assert sorted(runs) == ["v2-vs-v1", "v3-vs-v1", "v3-vs-v2"]
    cells = {(c["query"], c["gallery"]): c for c in matrix["cells"]}
    # A pair's cross cell is the IJB-C cross test with the gallery model on the OLD side.
    direct, _ = evaluate_features(meta, feats["v1"], feats["v2"], criterion_far=1e-3)
    flipped, _ = evaluate_features(meta, feats["v2"], feats["v1"], criterion_far=1e-3)
    assert cells[("v2", "v1")]["verification"] == direct["verification"]["cross"]
    assert cells[("v2", "v1")]["identification"] == direct["identification"]["cross"]
    assert direct["identification"]["cross"] != flipped["identification"]["cross"]
    # Diagonal: each model's own test; a rotation changes no cosine, so v3's equals v2's.
    assert matrix["self"]["v1"]["verification"] == direct["verification"]["self_old"]
    assert matrix["self"]["v3"]["verification"] == pytest.approx(matrix["self"]["v2"]["verification"], abs=1e-6)
    # Compatibility per pair, decided against the gallery model's own test.
    assert cells[("v2", "v1")]["compatible"] is True
    assert cells[("v2", "v1")]["verification"][FAR] > matrix["self"]["v1"]["verification"][FAR]
    for g in ("v1", "v2"):  # another space: cross falls to chance
        assert cells[("v3", g)]["compatible"] is False
        assert cells[("v3", g)]["verification"][FAR] < 0.2 * matrix["self"][g]["verification"][FAR]


def test_models_outside_every_pair_get_their_own_test(three_models):
    meta, feats = three_models
    matrix, runs = evaluate_matrix(meta, feats, ["v1", "v2", "v3"], pairs="adjacent", criterion_far=1e-3)
    assert matrix["pairs"] == [["v2", "v1"], ["v3", "v2"]]
    single, _ = evaluate_matrix(meta, {"v1": feats["v1"]}, ["v1"], criterion_far=1e-3)
    ref, _ = evaluate_features(meta, feats["v1"], None, criterion_far=1e-3)
    assert single["cells"] == [] and single["self"]["v1"]["verification"] == ref["verification"]["self_old"]
    with pytest.raises(ValueError, match="no features for model"):
        evaluate_matrix(meta, feats, ["v1", "v4"])


def test_markdown_and_files(three_models, tmp_path):
    meta, feats = three_models
    matrix, runs = evaluate_matrix(meta, feats, ["v1", "v2", "v3"], criterion_far=1e-3)
    md = matrix_markdown(matrix)
    v2v1 = next(c for c in matrix["cells"] if c["query"] == "v2")["verification"][FAR]
    row = next(line for line in md if line.startswith("| v2 |"))
    assert row == (f"| v2 | {v2v1:.3f} compatible | {matrix['self']['v2']['verification'][FAR]:.3f} (self) |  |")
    assert "Compatible pairs: 1 of 3" in "\n".join(md)
    write_matrix(matrix, tmp_path / "m", runs)
    assert json.loads((tmp_path / "m" / "matrix.json").read_text()) == matrix
    assert (tmp_path / "m" / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    pair = json.loads((tmp_path / "m" / "pairs" / "v3-vs-v1" / "report.json").read_text())
    assert pair["compatible"] is False
    assert not list((tmp_path / "m").glob("*.tmp*"))
