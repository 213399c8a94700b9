"""MixBCT: the credible mask and the per-batch mixing against loops written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unibct_ray.compat.class_geometry import class_centres, distances_to_centres
from unibct_ray.compat.mixbct import credible_mask, is_credible, mix_count, mix_embeddings, mix_positions

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def reference_credible(old: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per class: unit rows, their plain mean, Euclidean distance to it, the ceil(T n) closest."""
    out = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        unit = [old[i] / math.sqrt(sum(v * v for v in old[i])) for i in rows]
        centre = sum(unit) / len(unit)
        dist = [math.sqrt(sum((u - centre) ** 2)) for u in unit]
        k = math.ceil(round(threshold * len(rows), 9))
        for pos in sorted(range(len(rows)), key=lambda j: (dist[j], j))[:k]:
            out[rows[pos]] = True
    return out


def batch(seed: int = 0):
    """6 samples, 3 classes (sizes 1, 2, 3), d = 4; one row of class 2 far from the others."""
    rng = np.random.default_rng(seed)
    labels = np.array([2, 0, 2, 1, 2, 1])
    old = rng.normal(size=(6, 4)) + np.array([[3, 0, 0, 0]]) * (labels[:, None] == 2)
    old[4] = [-3.0, 1.0, 0.5, 0.0]  # class 2's outlier
    return old, labels


@pytest.mark.parametrize("threshold", [0.9, 0.6, 0.5, 0.34])
def test_credible_mask_matches_the_loop(threshold):
    old, labels = batch()
    centres, counts = class_centres(old, labels, 3)
    got = credible_mask(distances_to_centres(old, labels, centres), labels, threshold)
    np.testing.assert_array_equal(got, reference_credible(old, labels, threshold))
    assert counts.tolist() == [1, 2, 3]


def test_credible_mask_by_hand():
    old, labels = batch()
    dist = distances_to_centres(old, labels, class_centres(old, labels, 3)[0])
    # T = 0.9 keeps ceil(0.9 n) = n of every class this small
    assert credible_mask(dist, labels, 0.9).all()
    # T = 0.6: class 2 keeps ceil(1.8) = 2 of 3 and drops its outlier, row 4; class 1 keeps
    # ceil(1.2) = 2, class 0 its only row
    assert credible_mask(dist, labels, 0.6).tolist() == [True, True, True, True, False, True]
    # ceil with a tolerance: 0.7 * 10 is 7.000000000000001 in floating point; 7 rows, not 8
    assert credible_mask(np.arange(10.0), np.zeros(10, int), 0.7).sum() == 7
    assert credible_mask(np.arange(11.0), np.zeros(11, int), 0.9).tolist() == [True] * 10 + [False]


def test_credible_mask_on_a_larger_set():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 200)
    old = rng.normal(size=(200, 5)) + labels[:, None]
    dist = distances_to_centres(old, labels, class_centres(old, labels, 7)[0])
    np.testing.assert_array_equal(credible_mask(dist, labels, 0.9), reference_credible(old, labels, 0.9))


def test_is_credible_equals_isin():
    cred = torch.tensor([3, 8, 9, 20])
    index = torch.tensor([20, 1, 9, 25, 3, 0])
    assert is_credible(index, cred).tolist() == np.isin(index.numpy(), cred.numpy()).tolist()
    assert not is_credible(index, torch.zeros(0, dtype=torch.long)).any()


@pytest.mark.parametrize("credible,expected", [
    ([True] * 6, 2),                                 # round(0.3 * 6) = round(1.8) = 2
    ([False, True, False, False, False, False], 1),  # fewer credible rows than 2: all of them
    ([False] * 6, 0),
])
def test_mix_positions_take_min_k_credible(credible, expected):
    cred = torch.tensor(credible)
    for seed in range(20):
        pos = mix_positions(cred, 0.3, torch.Generator().manual_seed(seed))
        assert int(pos.sum()) == expected == mix_count(6, sum(credible), 0.3)
        assert not (pos & ~cred).any()  # only credible rows are mixed
    a = mix_positions(cred, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, mix_positions(cred, 0.3, torch.Generator().manual_seed(5)))  # seeded


def test_mix_positions_are_uniform_over_the_credible_rows():
    cred = torch.tensor([True, True, False, True, True, False, True, True, True, True])  # 8 credible
    hits = torch.zeros(10)
    for seed in range(2000):
        hits += mix_positions(cred, 0.3, torch.Generator().manual_seed(seed)).float()  # 3 of 8 each time
    assert hits[~cred].sum() == 0
    np.testing.assert_allclose(hits[cred].numpy() / 2000, 3 / 8, atol=0.05)


def test_mixed_head_input_and_its_loss_by_hand():
    """The head sees normalised old features at the mixed rows and the new embeddings elsewhere;
    the head loss is ArcFace's on that batch (written out here), and the replaced rows send no
    gradient to the new embeddings."""
    from unibct_ray.models.heads import NormalizedClassifier, margin_function

    old, labels = batch()
    rng = np.random.default_rng(1)
    emb_np = rng.normal(size=(6, 4)) * 2
    pos = np.array([False, True, False, False, True, False])
    emb = torch.tensor(emb_np, requires_grad=True)
    mixed = mix_embeddings(emb, torch.tensor(old), torch.tensor(pos))
    want = np.where(pos[:, None], old / np.linalg.norm(old, axis=1, keepdims=True), emb_np)
    np.testing.assert_allclose(mixed.detach().numpy(), want, rtol=1e-12)

    head = NormalizedClassifier(3, 4, margin_function("arcface", 8.0, 0.3)).double()
    loss = torch.nn.functional.cross_entropy(head(mixed, torch.tensor(labels)), torch.tensor(labels))
    w = head.weight.detach().numpy()
    cos = (want / np.linalg.norm(want, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    expected = 0.0
    for i, y in enumerate(labels):
        z = 8.0 * cos[i].copy()
        t = cos[i, y]
        z[y] = 8.0 * (math.cos(math.acos(t) + 0.3) if t > math.cos(math.pi - 0.3) else t - 0.3 * math.sin(0.3))
        expected += (math.log(sum(math.exp(v) for v in z)) - z[y]) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert (emb.grad[torch.tensor(pos)] == 0).all() and (emb.grad[~torch.tensor(pos)] != 0).any()
