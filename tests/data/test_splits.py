"""The four upgrade scenarios against hand-computed cases and a plain-loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from unibct_ray.data.splits import class_split, contiguous_labels, data_split, scenario_masks
from unibct_ray.errors import UserError


def rows_for(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def ref_data_split(labels, order, ratio):
    """Loop reference: per class, rows sorted by record order, first max(1, round(r n))."""
    first, rest = set(), set()
    for c in sorted(set(labels.tolist())):
        rows = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: order[i])
        k = max(1, round(ratio * len(rows)))
        first.update(rows[:k])
        rest.update(rows[k:] if len(rows) > 1 else rows)
    n = len(labels)
    return np.isin(np.arange(n), list(first)), np.isin(np.arange(n), list(rest))


def test_data_split_hand_computed_ties_and_singletons():
    # n = 1, 2, 3, 5, 15, 25, 10 at r = 0.3: k = 1, 1 (0.6), 1 (0.9), 2 (1.5 -> 2),
    # 4 (4.5 -> 4, half to even), 8 (7.5 -> 8), 3
    sizes = [1, 2, 3, 5, 15, 25, 10]
    labels = rows_for(sizes)
    first, rest = data_split(labels, np.arange(len(labels)), 0.3)
    expected_k = [1, 1, 1, 2, 4, 8, 3]
    for c, (n, k) in enumerate(zip(sizes, expected_k)):
        f = first[labels == c]
        r = rest[labels == c]
        assert f.sum() == k, (n, f.sum())
        assert f[:k].all() and not f[k:].any()  # the *first* k in record order
        if n == 1:
            assert r.all()  # a one-image class is in both halves
        else:
            assert r.sum() == n - k and not (f & r).any()


def test_data_split_uses_record_order_not_row_order():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, 40).tolist()
    labels = rows_for(sizes)
    perm = rng.permutation(len(labels))  # rows shuffled, record keys shuffled with them
    labels, order = labels[perm], np.arange(len(labels))[perm] * 3 + 7
    for ratio in (0.3, 0.5, 0.7):
        got = data_split(labels, order, ratio)
        ref = ref_data_split(labels, order, ratio)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_class_split_counts_and_rounding():
    labels = rows_for([3] * 10)
    m = class_split(labels, 0.3)
    assert set(labels[m].tolist()) == {0, 1, 2}
    labels = rows_for([1] * 5)  # 5 * 0.5 = 2.5 -> 2 (half to even)
    assert class_split(labels, 0.5).sum() == 2
    # MS1Mv3 witness: 93,431 classes -> 28,029 in class-0.3, 65,402 in the rest
    assert round(93_431 * 0.3) == 28_029 and 93_431 - 28_029 == 65_402
    labels = np.arange(93_431)
    m = class_split(labels, 0.3)
    assert m.sum() == 28_029 and (~m).sum() == 65_402


@pytest.mark.parametrize("scenario", ["extended-data", "extended-class", "open-data", "open-class"])
def test_scenario_overlap_properties(scenario):
    sizes = [1, 2, 5, 15, 25, 4, 7, 1, 3, 9]
    labels = rows_for(sizes)
    m = scenario_masks(scenario, labels, np.arange(len(labels)), 0.3)
    old_classes, new_classes = set(labels[m.old].tolist()), set(labels[m.new].tolist())
    if scenario.startswith("extended"):
        assert m.new.all()  # the new model trains on everything
        assert old_classes <= new_classes
    if scenario == "extended-class":
        assert old_classes == {0, 1, 2}  # round(10 * 0.3) = 3 first classes
    if scenario == "open-class":
        assert old_classes.isdisjoint(new_classes)
        assert (m.old ^ m.new).all()  # every image in exactly one side
    if scenario == "open-data":
        assert old_classes == new_classes == set(range(len(sizes)))
        both = m.old & m.new
        # only one-image classes are shared
        assert set(labels[both].tolist()) == {c for c, n in enumerate(sizes) if n == 1}
        assert (m.old | m.new).all()
    if scenario.endswith("data"):
        assert old_classes == set(range(len(sizes)))  # data splits keep every class


def test_contiguous_labels():
    new, classes = contiguous_labels(np.array([7, 7, 3, 10, 3]))
    np.testing.assert_array_equal(new, [1, 1, 0, 2, 0])
    np.testing.assert_array_equal(classes, [3, 7, 10])


def test_bad_ratio_and_scenario():
    with pytest.raises(UserError, match="--ratio"):
        class_split(np.arange(3), 1.0)
    with pytest.raises(UserError, match="unknown scenario 'wide'"):
        scenario_masks("wide", np.arange(3), np.arange(3), 0.3)
