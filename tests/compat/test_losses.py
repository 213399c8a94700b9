"""Compatibility losses against hand computations in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unibct_ray.compat.losses import (
    CompatLoss,
    bct_prototypes,
    l2_compat_loss,
    prototype_logits,
    prototype_loss,
)



pytestmark = pytest.mark.usefixtures("torch_one_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def data(seed: int = 0, b: int = 6, d: int = 8, c: int = 5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)) * 3, rng.normal(size=(b, d)) * 2, rng.normal(size=(c, d)), rng.integers(0, c, b)


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_l2_loss_by_hand(margin):
    f, o, _, _ = data()
    o[0] = f[0] * 2.5  # same direction: distance 0, clipped by the margin
    expected = np.mean([max(np.linalg.norm(unit(o[i]) - unit(f[i])) - margin, 0.0) for i in range(len(f))])
    ft, ot = torch.tensor(f), torch.tensor(o)
    got = l2_compat_loss(ft, ot, margin=margin)
    assert math.isclose(got.item(), expected, rel_tol=1e-12)
    assert torch.equal(ft, torch.tensor(f)) and torch.equal(ot, torch.tensor(o))


def test_l2_loss_gradient_finite_at_zero_distance():
    f = torch.tensor([[1.0, 2.0]], requires_grad=True)
    l2_compat_loss(f, torch.tensor([[2.0, 4.0]])).backward()
    assert torch.isfinite(f.grad).all()


def test_prototype_logits_and_loss_by_hand():
    f, _, p, y = data(1)
    z = 30.0 * unit(f) @ unit(p).T
    np.testing.assert_allclose(prototype_logits(torch.tensor(f), torch.tensor(p)).numpy(), z, rtol=1e-12)
    expected = -np.mean(log_softmax(z)[np.arange(len(y)), y])
    got = prototype_loss(torch.tensor(f), torch.tensor(p), torch.tensor(y), s=30.0)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


def test_prototype_loss_with_angular_margin_by_hand():
    f, _, p, y = data(2)
    s, m = 16.0, 0.3
    cos = unit(f) @ unit(p).T
    z = s * cos
    for i, c in enumerate(y):
        t = cos[i, c]
        z[i, c] = s * (math.cos(math.acos(t) + m) if t > math.cos(math.pi - m) else t - m * math.sin(m))
    expected = -np.mean(log_softmax(z)[np.arange(len(y)), y])
    got = prototype_loss(torch.tensor(f), torch.tensor(p), torch.tensor(y), s=s, m=m)
    assert math.isclose(got.item(), expected, rel_tol=1e-10)
    with pytest.raises(ValueError, match="labels"):
        prototype_logits(torch.tensor(f), torch.tensor(p), m=0.3)


def test_bct_prototypes_mix_known_and_synthesized():
    rng = np.random.default_rng(3)
    old_centres = rng.normal(size=(4, 6))
    means = rng.normal(size=(5, 6)) * 4
    class_map = np.array([2, -1, 0, -1, 3])
    got = bct_prototypes(torch.tensor(old_centres), class_map, torch.tensor(means)).numpy()
    expected = np.stack([unit(old_centres[k]) if k >= 0 else unit(means[c]) for c, k in enumerate(class_map)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # an old model that knows no class: everything synthesized
    np.testing.assert_allclose(bct_prototypes(None, None, torch.tensor(means)).numpy(), unit(means), rtol=1e-6)
    with pytest.raises(ValueError, match="old_centres is None"):
        bct_prototypes(None, class_map, torch.tensor(means))
    with pytest.raises(ValueError, match="old class 7"):
        bct_prototypes(torch.tensor(old_centres), np.array([7, -1, 0, -1, 3]), torch.tensor(means))


def test_compat_loss_methods():
    f, o, p, y = (torch.tensor(a) for a in data(4))
    assert CompatLoss("independent", weight=5.0)(f, o, y, p).item() == 0.0
    assert CompatLoss("l2").weight == 10.0 and CompatLoss("bct").weight == 1.0
    l2 = CompatLoss("l2", weight=10.0, l2_margin=0.2)
    torch.testing.assert_close(l2(f, o), 10.0 * l2_compat_loss(f, o, 0.2))
    bct = CompatLoss("bct", weight=2.0, scale=30.0)
    torch.testing.assert_close(bct(f, labels=y, prototypes=p), 2.0 * prototype_loss(f, p, y, s=30.0))
    uni = CompatLoss("unibct", weight=1.0, scale=20.0, margin=0.1)
    torch.testing.assert_close(uni.value(f, labels=y, prototypes=p), prototype_loss(f, p, y, s=20.0, m=0.1))
    # weight 0 (unibct before its first refinement): no prototypes needed
    assert uni(f, labels=y, prototypes=None, weight=uni.weight_at(3, (10, 20))).item() == 0.0
    with pytest.raises(ValueError, match="old embeddings"):
        l2(f)
    with pytest.raises(ValueError, match="labels and prototypes"):
        bct(f, labels=y)
    with pytest.raises(ValueError, match="independent, l2, bct, unibct"):
        CompatLoss("lce")


def test_weight_schedule():
    uni, l2 = CompatLoss("unibct", weight=1.5), CompatLoss("l2", weight=10.0)
    assert [uni.weight_at(e, (10, 20)) for e in (0, 9, 10, 19, 20, 34)] == [0.0, 0.0, 1.5, 1.5, 1.5, 1.5]
    assert l2.weight_at(0, (10, 20)) == 10.0 and l2.weight_at(0) == 10.0
    assert CompatLoss("independent").weight_at(30, (10,)) == 0.0
    with pytest.raises(ValueError, match="refinement epoch"):
        uni.weight_at(5, ())


def test_from_config_section():
    from types import SimpleNamespace

    section = SimpleNamespace(method="l2", weight=10.0, l2_margin=0.2, scale=30.0, margin=0.0)
    loss = CompatLoss.from_section(section)
    assert (loss.method, loss.weight, loss.l2_margin) == ("l2", 10.0, 0.2)
