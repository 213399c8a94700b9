"""Prototype refinement against a slow per-class numpy loop with an explicit inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unibct_ray.bench.refine import bench_refine
from unibct_ray.compat.prototypes import (
    balanced_class_ranges,
    class_counts,
    class_means,
    class_offsets,
    means_from_sums,
    partial_class_sums,
    refine_class_range,
    refine_prototypes,
)



pytestmark = pytest.mark.usefixtures("torch_one_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def slow_refine(old: np.ndarray, new: np.ndarray, labels: np.ndarray, num_classes: int, lam: float = 0.9,
                tau: float = 0.05, axis: str = "row") -> np.ndarray:
    """ARCHITECTURE §5 written out, one class at a time, float64, explicit inverse."""
    out = np.zeros((num_classes, old.shape[1]))
    for c in range(num_classes):
        o = old[labels == c].astype(np.float64)
        n = new[labels == c].astype(np.float64)
        if len(o) == 0:
            continue
        if len(o) == 1:
            out[c] = unit(o[0])
            continue
        nh = unit(n)
        s = nh @ nh.T / tau
        np.fill_diagonal(s, -np.inf)
        ax = 1 if axis == "row" else 0
        e = np.exp(s - s.max(axis=ax, keepdims=True))
        p = e / e.sum(axis=ax, keepdims=True)
        o_ref = (1 - lam) * np.linalg.inv(np.eye(len(o)) - lam * p) @ o
        out[c] = unit(o_ref.mean(axis=0))
    return out


def clustered(sizes: list[int], d: int = 16, seed: int = 0, shuffle: bool = True):
    """old, new float32 [n, d] (class centre + noise) and labels [n] (shuffled rows)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    old = (rng.normal(size=(len(sizes), d)) * 2)[labels] + rng.normal(size=(labels.size, d))
    new = (rng.normal(size=(len(sizes), d)) * 2)[labels] + rng.normal(size=(labels.size, d))
    perm = rng.permutation(labels.size) if shuffle else np.arange(labels.size)
    return old[perm].astype(np.float32), new[perm].astype(np.float32), labels[perm]


SIZES = [1, 2, 3, 5, 5, 5, 8, 13, 2, 40, 3, 1, 21]


@pytest.mark.parametrize("axis", ["row", "column"])
def test_matches_slow_loop_with_explicit_inverse(axis):
    old, new, labels = clustered(SIZES)
    expected = slow_refine(old, new, labels, len(SIZES), axis=axis)
    got = refine_prototypes(old, new, labels, len(SIZES), axis=axis)
    assert got.dtype == torch.float32 and got.shape == (len(SIZES), 16)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    got64 = refine_prototypes(old, new, labels, len(SIZES), axis=axis, dtype=torch.float64)
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-10)


def test_other_lambda_and_temperature():
    old, new, labels = clustered(SIZES, seed=5)
    expected = slow_refine(old, new, labels, len(SIZES), lam=0.5, tau=0.2)
    got = refine_prototypes(old, new, labels, len(SIZES), lam=0.5, tau=0.2, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def test_column_softmax_is_the_plain_normalised_mean():
    """1^T P = 1^T for column-stochastic P, so mean(O') = mean(O): the reference refines nothing."""
    old, new, labels = clustered([2, 7, 30, 64, 3], d=32, seed=1)
    col = refine_prototypes(old, new, labels, 5, axis="column")
    plain = np.stack([unit(old[labels == c].astype(np.float64).mean(0)) for c in range(5)])
    np.testing.assert_allclose(col.numpy(), plain, atol=1e-5)
    row = refine_prototypes(old, new, labels, 5, axis="row")
    assert np.abs(row.numpy() - plain)[2:4].max() > 1e-3  # the row variant does move them


def test_one_image_class_keeps_its_old_feature():
    old, new, labels = clustered([1, 4], seed=2)
    got = refine_prototypes(old, new, labels, 2)
    np.testing.assert_allclose(got[0].numpy(), unit(old[labels == 0][0]), atol=1e-7)


def test_row_refinement_pulls_toward_the_cluster():
    rng = np.random.default_rng(4)
    d, centre = 16, unit(rng.normal(size=16))
    cluster = centre + 0.05 * rng.normal(size=(9, d))
    outlier = unit(rng.normal(size=d)) * 3.0  # far off, and large, so it drags the plain mean
    old = np.vstack([cluster, outlier]).astype(np.float32)
    new = old + 0.01 * rng.normal(size=old.shape).astype(np.float32)  # the new model sees the same structure
    labels = np.zeros(10, dtype=np.int64)
    row = refine_prototypes(old, new, labels, 1)[0].numpy()
    plain = unit(old.mean(0))
    cluster_mean = unit(cluster.mean(0))
    assert row @ cluster_mean > plain @ cluster_mean + 0.05


def test_batched_sizes_equal_one_class_at_a_time():
    sizes = [2, 3, 3, 4, 7, 7, 7, 11, 50, 2, 120, 9, 1]
    old, new, labels = clustered(sizes, d=24, seed=6)
    together = refine_prototypes(old, new, labels, len(sizes))
    alone = torch.cat([refine_prototypes(old[labels == c], new[labels == c], np.zeros((labels == c).sum(), dtype=np.int64), 1)
                       for c in range(len(sizes))])
    np.testing.assert_allclose(together.numpy(), alone.numpy(), atol=1e-6)
    # chunks of one class each (a tiny memory budget) change nothing either
    tiny_budget = refine_prototypes(old, new, labels, len(sizes), max_batch_bytes=1)
    np.testing.assert_allclose(tiny_budget.numpy(), together.numpy(), atol=1e-6)


def test_refine_false_gives_normalised_means():
    old, new, labels = clustered(SIZES, seed=7)
    plain = np.stack([unit(old[labels == c].astype(np.float64).mean(0)) for c in range(len(SIZES))])
    np.testing.assert_allclose(refine_prototypes(old, None, labels, len(SIZES), refine=False).numpy(), plain, atol=1e-6)
    np.testing.assert_allclose(class_means(old, labels, len(SIZES)).numpy(), plain, atol=1e-6)
    raw = class_means(old, labels, len(SIZES), normalize=False).numpy()
    np.testing.assert_allclose(raw[3], old[labels == 3].mean(0), rtol=1e-5)


def test_class_ranges_concatenated_equal_all_classes():
    old, new, labels = clustered(SIZES, seed=8)
    order = np.argsort(labels, kind="stable")
    old_s, new_s, lab_s = old[order], new[order], labels[order]
    offsets = class_offsets(lab_s, len(SIZES))
    ranges = balanced_class_ranges(class_counts(labels, len(SIZES)).numpy(), 3, d=16)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(SIZES)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    parts = []
    for c0, c1 in ranges:
        rows = slice(offsets[c0], offsets[c1])
        parts.append(refine_class_range(old_s[rows], new_s[rows], lab_s[rows], c0, c1))
        assert parts[-1].shape == (c1 - c0, 16)
    full = refine_prototypes(old, new, labels, len(SIZES))
    np.testing.assert_allclose(torch.cat(parts).numpy(), full.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="outside the range"):
        refine_class_range(old_s, new_s, lab_s, 0, 3)


def test_balanced_ranges_follow_the_work():
    counts = np.array([600] + [10] * 99)
    ranges = balanced_class_ranges(counts, 2, d=256)
    assert ranges[0] == (0, 1)  # the one big class is as much work as all the others
    assert balanced_class_ranges([3, 3], 4) == [(0, 1), (1, 1), (1, 2), (2, 2)]


def test_partial_sums_add_up_over_parts():
    old, _, labels = clustered(SIZES, seed=9)
    c = len(SIZES)
    s1, n1 = partial_class_sums(old[:30], labels[:30], c)
    s2, n2 = partial_class_sums(old[30:], labels[30:], c)
    assert s1.dtype == torch.float64
    torch.testing.assert_close(means_from_sums(s1 + s2, n1 + n2), class_means(old, labels, c))


def test_absent_classes_zero_rows_or_error():
    old, new, labels = clustered([3, 4], seed=10)
    got = refine_prototypes(old, new, labels, 4)
    assert torch.equal(got[2:], torch.zeros(2, 16))
    assert class_counts(labels, 4).tolist() == [3, 4, 0, 0]
    with pytest.raises(ValueError, match="2 of 4 classes have no rows"):
        refine_prototypes(old, new, labels, 4, on_absent="raise")


def test_inputs_untouched_half_precision_and_validation():
    old, new, labels = clustered(SIZES, seed=11)
    o16, n16 = torch.from_numpy(old).half(), torch.from_numpy(new).half()
    keep = (o16.clone(), n16.clone(), labels.copy())
    got = refine_prototypes(o16, n16, labels, len(SIZES))
    assert torch.equal(o16, keep[0]) and torch.equal(n16, keep[1]) and np.array_equal(labels, keep[2])
    expected = slow_refine(o16.float().numpy(), n16.float().numpy(), labels, len(SIZES))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        refine_prototypes(old, new, labels, 3)
    with pytest.raises(ValueError, match="axis"):
        refine_prototypes(old, new, labels, len(SIZES), axis="both")
    with pytest.raises(ValueError, match="differ in shape"):
        refine_prototypes(old, new[:, :8], labels, len(SIZES))
    with pytest.raises(ValueError, match="new-model features"):
        refine_prototypes(old, None, labels, len(SIZES))


def test_bench_smoke():
    res = bench_refine(30, mean_size=8, max_size=40, d=16, repeats=1)
    assert res["classes"] == 30 and res["max_abs_diff"] < 1e-5 and res["speedup"] > 0


def test_device_argument_cpu_equals_default():
    """``device="cpu"`` given explicitly is the default path: identical prototypes."""
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(7), [1, 2, 3, 5, 5, 8, 4])
    old = rng.standard_normal((labels.size, 12)).astype(np.float32)
    new = rng.standard_normal((labels.size, 12)).astype(np.float32)
    default = refine_prototypes(old, new, labels, 8)
    explicit = refine_prototypes(old, new, labels, 8, device="cpu")
    assert explicit.device.type == "cpu"
    assert torch.equal(default, explicit)
    assert torch.equal(refine_prototypes(old, None, labels, 8, refine=False),
                       refine_prototypes(old, None, labels, 8, refine=False, device=torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_matches_cpu():
    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(6), [1, 2, 9, 9, 30, 4])
    old = rng.standard_normal((labels.size, 32)).astype(np.float32)
    new = rng.standard_normal((labels.size, 32)).astype(np.float32)
    cpu = refine_prototypes(old, new, labels, 6)
    cuda = refine_prototypes(old, new, labels, 6, device="cuda")
    assert cuda.device.type == "cpu"  # results come back to the host
    assert torch.allclose(cuda, cpu, atol=1e-4)
