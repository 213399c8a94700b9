"""The refinement oracle: its sample weights reproduce the refined prototypes, its per-class
scores match a plain loop, and a tiny run end to end writes the JSON and the plot."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from unibct_ray.bench.oracle import class_scores, sample_weights, summarise
from unibct_ray.compat.prototypes import refine_prototypes


def _clusters(sizes, d=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    old = rng.normal(size=(len(sizes), d))[labels] + 0.8 * rng.normal(size=(len(labels), d))
    new = rng.normal(size=(len(sizes), d))[labels] + 0.8 * rng.normal(size=(len(labels), d))
    return old / np.linalg.norm(old, axis=1, keepdims=True), new, labels


@pytest.mark.parametrize("axis", ["row", "column"])
def test_weights_reproduce_the_refined_prototype(axis):
    old, new, labels = _clusters([1, 2, 5, 9, 17])
    protos = refine_prototypes(torch.from_numpy(old), torch.from_numpy(new), labels, 5, axis=axis,
                               dtype=torch.float64).numpy()
    for c in range(5):
        rows = labels == c
        w = sample_weights(new[rows], axis=axis)
        assert w.sum() == pytest.approx(1.0) and (w > 0).all()
        p = w @ old[rows]
        np.testing.assert_allclose(p / np.linalg.norm(p), protos[c], atol=1e-9)
        if axis == "column":  # column softmax: exactly the plain mean
            np.testing.assert_allclose(w, 1.0 / rows.sum(), atol=1e-12)


def test_row_weights_against_an_explicit_inverse():
    rng = np.random.default_rng(1)
    new = rng.normal(size=(6, 4))
    nh = new / np.linalg.norm(new, axis=1, keepdims=True)
    s = nh @ nh.T / 0.05
    np.fill_diagonal(s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = (1 - 0.9) * np.ones(6) @ np.linalg.inv(np.eye(6) - 0.9 * p) / 6
    np.testing.assert_allclose(sample_weights(new), w, atol=1e-12)


def test_class_scores_match_a_loop():
    old, new, labels = _clusters([1, 3, 6, 6], seed=2)
    centres = np.random.default_rng(3).normal(size=(4, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    dirty = np.zeros(len(labels), bool)
    dirty[[1, 5, 6]] = True  # one of class 1, two of class 2
    sc = class_scores(old, new, labels, centres, dirty)
    for c in range(4):
        rows = labels == c
        m = old[rows].mean(0)
        assert sc["cos_mean"][c] == pytest.approx(float(m @ centres[c] / np.linalg.norm(m)), abs=1e-6)
        assert sc["ess_mean"][c] == pytest.approx(rows.sum())
        w = sample_weights(new[rows])
        assert sc["ess_row"][c] == pytest.approx(1 / (w ** 2).sum())
        assert sc["dirty_weight_row"][c] == pytest.approx(w[dirty[rows]].sum())
        assert sc["dirty_share"][c] == pytest.approx(dirty[rows].mean())
    np.testing.assert_allclose(sc["cos_column"], sc["cos_mean"], atol=1e-6)
    s = summarise(sc)
    assert s["overall"]["classes"] == 4 and set(s["by_size"]) == {"1", "3-4", "5-8"}
    assert s["by_size"]["5-8"]["classes"] == 2


@pytest.mark.slow
def test_tiny_oracle_end_to_end(tmp_path):
    from unibct_ray.bench.oracle import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--identities", "20", "--images-per-identity", "6", "--rates", "0", "0.2", "--epochs", "1",
                      "--old-identities", "20", "--old-images", "4", "--population-images", "2", "--plot", str(tmp_path / "o.png")])
    res = run(a)
    assert set(res["rates"]) == {"0", "0.2"}
    for r in res["rates"].values():
        assert r["overall"]["classes"] == 20 and r["images"] == 120
        assert -1 <= r["overall"]["cos_row"] <= 1
    assert res["rates"]["0"]["overall"]["dirty_share"] == 0
    assert res["rates"]["0"]["vs_population_centre"]["overall"]["classes"] == 20
    assert (tmp_path / "o.png").stat().st_size > 5_000
