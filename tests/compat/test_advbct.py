"""AdvBCT: class radii (IQR), elastic boundaries, the point-to-set and adversarial losses against
loops and numpy written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unibct_ray.compat.advbct import (
    AdvBCTLoss,
    AdvBCTModule,
    adversarial_weight,
    elastic_radius,
    grad_reverse,
    grl_coefficient,
    inlier_radius,
    point_to_set_loss,
)
from unibct_ray.compat.class_geometry import class_centres, distances_to_centres
from unibct_ray.compat.losses import CompatLoss

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_metadata(old: np.ndarray, labels: np.ndarray, num_classes: int):
    """Per class: centre = mean of unit rows; radii sorted; 1.5 IQR outliers out when n >= 4."""
    centres = np.zeros((num_classes, old.shape[1]))
    r_max = np.zeros(num_classes)
    counts = np.zeros(num_classes, int)
    for c in range(num_classes):
        rows = [unit(old[i]) for i in range(len(labels)) if labels[i] == c]
        counts[c] = len(rows)
        if not rows:
            continue
        centres[c] = sum(rows) / len(rows)
        r = sorted(float(np.linalg.norm(u - centres[c])) for u in rows)
        n = len(r)
        if n >= 4:
            q1, q3 = r[int(n / 4)], r[int(3 * n / 4)]
            r = [x for x in r if q1 - 1.5 * (q3 - q1) <= x <= q3 + 1.5 * (q3 - q1)]
        r_max[c] = max(r)
    return centres, r_max, counts


def old_set(seed: int = 0):
    """14 old features, 3 classes (sizes 8, 5, 1), d = 4; class 0 has one far outlier."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 8 + [1] * 5 + [2])
    means = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    old = means[labels] + rng.normal(size=(14, 4)) * 0.7
    old[7] = [-4.0, 0.5, 0.0, 1.0]  # class 0's outlier: its radius is far above q3 + 1.5 IQR
    return old, labels


def test_inlier_radius_by_hand():
    dist = np.array([0.1, 0.12, 0.2, 0.11, 0.5, 0.13, 0.9, 0.3, 0.7])
    labels = np.array([0, 0, 1, 0, 1, 0, 0, 1, 2])
    r_max, counts = inlier_radius(dist, labels, 4)
    # class 0: sorted [.1 .11 .12 .13 .9], q1 = r[1] = .11, q3 = r[3] = .13: .9 > .16 is out
    # class 1: three radii, no IQR: .5; class 2: one radius; class 3: none
    np.testing.assert_allclose(r_max, [0.13, 0.5, 0.7, 0.0])
    assert counts.tolist() == [5, 3, 1, 0]


def test_class_metadata_matches_the_loop():
    old, labels = old_set()
    centres, counts = class_centres(old, labels, 4)
    r_max, counts2 = inlier_radius(distances_to_centres(old, labels, centres), labels, 4)
    ref_c, ref_r, ref_n = reference_metadata(old, labels, 4)
    np.testing.assert_allclose(centres, ref_c, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r_max, ref_r, rtol=1e-12)
    assert counts.tolist() == counts2.tolist() == ref_n.tolist() == [8, 5, 1, 0]
    all_r0 = np.linalg.norm(unit(old[labels == 0]) - ref_c[0], axis=1)
    assert r_max[0] < all_r0.max()  # the outlier was removed


def test_elastic_radius_by_hand():
    r_max = torch.tensor([0.2, 0.7, 0.4])
    w = torch.tensor([0.0, 1.0, -0.5])
    sig = [0.5, 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5))]
    want = [0.2 + 0.2 * sig[0], 0.7 - 0.3 * sig[1], 0.4 - 0.0]
    np.testing.assert_allclose(elastic_radius(r_max, w, 0.4).numpy(), want, rtol=1e-6)


def test_point_to_set_loss_by_hand():
    old, labels_old = old_set()
    centres, r_max, counts = reference_metadata(old, labels_old, 3)
    rng = np.random.default_rng(1)
    # the batch: 6 samples of the 3 classes, d = 4
    labels = np.array([0, 1, 2, 0, 1, 1])
    f = rng.normal(size=(6, 4)) + np.eye(4)[labels] * 2
    radius = np.array([0.05, 0.3, 0.2])  # class 2 has one old feature: skipped whatever its radius
    excess = []
    for i, y in enumerate(labels):
        d = np.linalg.norm(unit(f[i]) - centres[y])
        if counts[y] >= 2 and d > radius[y]:
            excess.append(d - radius[y])
    assert 0 < len(excess) < 6
    got = point_to_set_loss(torch.tensor(f), torch.tensor(labels), torch.tensor(centres), torch.tensor(radius),
                            torch.tensor(counts >= 2))
    assert got.item() == pytest.approx(np.mean(excess), rel=1e-12)
    # nobody outside: 0, and the radius still receives a (zero) gradient
    r = torch.full((3,), 5.0, dtype=torch.float64, requires_grad=True)
    zero = point_to_set_loss(torch.tensor(f), torch.tensor(labels), torch.tensor(centres), r, torch.tensor(counts >= 2))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(r.grad, torch.zeros(3, dtype=torch.float64))


def test_gradient_reversal_and_schedules():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    y.backward(g)
    torch.testing.assert_close(x.grad, -0.3 * g)
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_coefficient(0.999) == pytest.approx(2 / (1 + math.exp(-9.99)) - 1)
    # 4 (E - e + 1) / E for e = 1..E: 4 in the first epoch, 4 / E in the last
    assert [adversarial_weight(e, 4) for e in range(4)] == [4.0, 3.0, 2.0, 1.0]


def reference_discriminator_nll(module: AdvBCTModule, f: np.ndarray, o: np.ndarray) -> float:
    """Linear -> BatchNorm1d (batch statistics, biased variance, eps 1e-5) -> ReLU -> Linear,
    on [unit(f); unit(o)] labelled [0]*b + [1]*b; mean NLL."""
    lin1, bn, _, lin2 = module.discriminator
    x = np.concatenate([unit(f), unit(o)])
    h = x @ lin1.weight.detach().numpy().T + lin1.bias.detach().numpy()
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.eps) * bn.weight.detach().numpy() + bn.bias.detach().numpy()
    z = np.maximum(h, 0) @ lin2.weight.detach().numpy().T + lin2.bias.detach().numpy()
    target = [0] * len(f) + [1] * len(o)
    return float(np.mean([math.log(sum(math.exp(v) for v in z[i])) - z[i, t] for i, t in enumerate(target)]))


def test_advbct_loss_by_hand():
    """L_comp = 4 L_p2s + 4 (E - e + 1) / E L_adv with the module's own w and discriminator."""
    old, labels_old = old_set()
    centres, r_max, counts = reference_metadata(old, labels_old, 3)
    torch.manual_seed(0)
    module = AdvBCTModule(torch.tensor(centres), torch.tensor(r_max), torch.tensor(counts), hidden=5,
                          threshold=0.4, seed=7).double()
    w = module.w.detach().numpy()
    assert ((w >= -1) & (w <= 1)).all()  # U(-1, 1)
    r_eb = np.abs(r_max - 0.4) / (1 + np.exp(-w))
    radius = np.where(r_max < 0.4, r_max + r_eb, r_max - r_eb)

    rng = np.random.default_rng(2)
    labels = np.array([0, 1, 2, 0, 1, 1])
    f, o = rng.normal(size=(6, 4)) + np.eye(4)[labels], rng.normal(size=(6, 4))
    excess = [np.linalg.norm(unit(f[i]) - centres[y]) - radius[y] for i, y in enumerate(labels)]
    excess = [e for e, y in zip(excess, labels) if e > 0 and counts[y] >= 2]
    p2s = np.mean(excess) if excess else 0.0
    adv = reference_discriminator_nll(module, f, o)

    loss = AdvBCTLoss(module, p2s_weight=4.0, adv_weight=4.0)
    compat = CompatLoss("advbct", term=loss)
    compat.schedule(step=30, total_steps=100, epoch=2, epochs=5)  # e = 3 of 5: 4 * 3 / 5
    assert loss.a == pytest.approx(grl_coefficient(0.3)) and loss.adv_weight == pytest.approx(2.4)
    ft = torch.tensor(f, requires_grad=True)
    got = compat.value(ft, torch.tensor(o), torch.tensor(labels))
    assert got.item() == pytest.approx(4.0 * p2s + 2.4 * adv, rel=1e-6)  # the module keeps metadata in float32

    # the discriminator's own gradient is the plain one; the embeddings get it reversed, times a
    got.backward()
    g_rev = ft.grad.clone()
    fp = torch.tensor(f, requires_grad=True)
    x = torch.cat([fp / fp.norm(dim=1, keepdim=True), torch.tensor(unit(o))])
    target = torch.tensor([0] * 6 + [1] * 6)
    plain = torch.nn.functional.cross_entropy(module.discriminator(x), target)
    p2s_only = 4.0 * point_to_set_loss(fp, torch.tensor(labels), module.centres, module.radius(), module.valid)
    g_plain, = torch.autograd.grad(2.4 * plain, fp, retain_graph=True)
    g_p2s, = torch.autograd.grad(p2s_only, fp)
    torch.testing.assert_close(g_rev, g_p2s - loss.a * g_plain)


def test_module_state_holds_the_trained_parts_only():
    old, labels = old_set()
    centres, r_max, counts = reference_metadata(old, labels, 3)
    m = AdvBCTModule(torch.tensor(centres), torch.tensor(r_max), torch.tensor(counts), hidden=5, seed=1)
    keys = set(m.state_dict())
    assert "w" in keys and any(k.startswith("discriminator.") for k in keys)
    assert not keys & {"centres", "r_max", "valid"}  # recomputed from the old features, not saved
    m2 = AdvBCTModule(torch.tensor(centres), torch.tensor(r_max), torch.tensor(counts), hidden=5, seed=1)
    assert torch.equal(m.w, m2.w)  # seeded: every rank starts from the same radii
    assert m.valid.tolist() == [True, True, False]


def test_methods_with_a_term_refuse_to_run_without_it():
    for method in ("nccl", "advbct"):
        with pytest.raises(ValueError, match="needs its term"):
            CompatLoss(method)
    mix = CompatLoss("mixbct", weight=5.0)
    assert mix.weight == 0.0 and mix.weight_at(3) == 0.0
    assert mix.value(torch.ones(2, 3)).item() == 0.0


def test_point_to_set_mean_over_ranks_is_the_global_mean():
    """Two simulated ranks with unequal numbers of violating rows: the average of their losses
    (what DDP's gradient average sees) is the mean over all violating rows of the whole batch."""
    old, labels_old = old_set()
    centres, _, counts = reference_metadata(old, labels_old, 3)
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 0, 1, 1, 0])
    f = rng.normal(size=(6, 4))
    f[0], f[2] = centres[0], 3 * centres[0]  # inside class 0's boundary: rank 0 has fewer violations
    radius = torch.tensor([0.9, 0.2, 0.2], dtype=torch.float64)
    args = (torch.tensor(centres), radius, torch.tensor(counts >= 2))
    whole = point_to_set_loss(torch.tensor(f), torch.tensor(labels), *args)
    halves = [(torch.tensor(f[s]), torch.tensor(labels[s])) for s in (slice(0, 3), slice(3, 6))]
    local = [int(((np.linalg.norm(unit(f[s]) - centres[labels[s]], axis=1) > radius.numpy()[labels[s]])).sum())
             for s in (slice(0, 3), slice(3, 6))]
    assert local[0] != local[1] and min(local) > 0
    total = torch.tensor(float(sum(local)), dtype=torch.float64)
    ranks = [point_to_set_loss(x, y, *args, count_sum=lambda c: total, world=2) for x, y in halves]
    assert float(sum(ranks) / 2) == pytest.approx(whole.item(), rel=1e-12)
    plain = [point_to_set_loss(x, y, *args) for x, y in halves]
    assert float(sum(plain) / 2) != pytest.approx(whole.item(), rel=1e-3)  # per-rank means would differ
