"""NCCL: the queue, the consensus weights and both contrastive terms against a loop written out
here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unibct_ray.compat.losses import CompatLoss
from unibct_ray.compat.nccl import FeatureQueue, NCCLLoss, nccl_loss
from unibct_ray.models.heads import NormalizedClassifier, margin_function

pytestmark = pytest.mark.usefixtures("torch_one_thread")

S, M = 4.0, 0.3  # a small head scale keeps the logit products' softmax away from one-hot


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def arcface_logits(x: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    cos = unit(x) @ unit(w).T
    z = S * cos
    for i, y in enumerate(labels):
        t = cos[i, y]
        z[i, y] = S * (math.cos(math.acos(t) + M) if t > math.cos(math.pi - M) else t - M * math.sin(M))
    return z


def reference_terms(f, o, new_logits, labels, q_emb, q_logits, q_labels, tau):
    """l1, l2 for each local sample i over the queue entries j with y_j = y_i, by loops."""
    l1 = l2 = 0.0
    for i in range(len(labels)):
        fi, oi = unit(f[i]), unit(o[i])
        s1 = [float(fi @ q) / tau for q in q_emb]
        s2 = [float(new_logits[i] @ z) / tau for z in q_logits]
        lse1 = math.log(sum(math.exp(v - max(s1)) for v in s1)) + max(s1)
        lse2 = math.log(sum(math.exp(v - max(s2)) for v in s2)) + max(s2)
        pos = [j for j in range(len(q_labels)) if q_labels[j] == labels[i]]
        w = {j: (float(oi @ q_emb[j]) + 1) / 2 for j in pos}
        assert all(-1e-12 <= v <= 1.0 + 1e-12 for v in w.values())  # cosines, rescaled to [0, 1]
        l1 += -sum(w[j] * (s1[j] - lse1) for j in pos) / len(pos)
        l2 += -sum(w[j] * (s2[j] - lse2) for j in pos) / len(pos)
    return l1 / len(labels), l2 / len(labels)


def test_queue_is_a_fifo_of_the_last_rows():
    q = FeatureQueue(5)
    for start in (0, 3, 6):  # rows 0..8 in three pushes of 3
        rows = torch.arange(start, start + 3)
        q.push(rows[:, None].double().repeat(1, 2), rows[:, None].double().repeat(1, 4), rows)
    emb, logits, labels = q.contents()
    assert q.filled == 5 and sorted(labels.tolist()) == [4, 5, 6, 7, 8]  # the oldest four are gone
    assert torch.equal(emb[:, 0].long(), labels) and torch.equal(logits[:, 3].long(), labels)
    q.push(torch.zeros(7, 2, dtype=torch.float64), torch.zeros(7, 4, dtype=torch.float64), torch.arange(10, 17))
    assert sorted(q.contents()[2].tolist()) == [12, 13, 14, 15, 16]  # more rows than the queue: the last ones


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_nccl_terms_match_the_loop(tau):
    rng = np.random.default_rng(0)
    b, c, d, n = 6, 3, 4, 10
    labels = np.array([0, 1, 2, 0, 1, 1])
    f, o = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    new_logits = rng.normal(size=(b, c)) * 3
    q_labels = np.concatenate([rng.integers(0, c, n - b), labels])  # the queue holds the batch
    q_emb = unit(np.concatenate([rng.normal(size=(n - b, d)), o]))
    q_logits = rng.normal(size=(n, c)) * 3
    l1, l2 = nccl_loss(*(torch.tensor(a) for a in (f, o, new_logits, labels, q_emb, q_logits, q_labels)), tau=tau)
    r1, r2 = reference_terms(f, o, new_logits, labels, q_emb, q_logits, q_labels, tau)
    assert l1.item() == pytest.approx(r1, rel=1e-12) and l2.item() == pytest.approx(r2, rel=1e-12)


def test_nccl_loss_updates_the_queue_before_the_loss():
    """Two steps through the new head: the old logits carry the margin on the target, the queue
    holds the current batch when the loss is taken, the oldest rows fall out, and
    L_comp = alpha l1 + beta l2."""
    torch.manual_seed(0)
    head = NormalizedClassifier(3, 4, margin_function("arcface", S, M)).double()
    w = head.weight.detach().numpy()
    rng = np.random.default_rng(1)
    first_o, first_y = rng.normal(size=(4, 4)), np.array([2, 0, 1, 1])
    labels = np.array([0, 1, 2, 0, 1, 1])
    f, o = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))

    term = NCCLLoss(head, queue_size=8, alpha=0.7, beta=0.2, tau=1.0)
    compat = CompatLoss("nccl", term=term)
    first = compat.value(torch.tensor(rng.normal(size=(4, 4))), torch.tensor(first_o), torch.tensor(first_y),
                         logits=torch.tensor(rng.normal(size=(4, 3))))
    assert torch.isfinite(first)  # an empty queue: the current batch alone gives every row a positive
    ft = torch.tensor(f, requires_grad=True)
    new_logits = head(ft, torch.tensor(labels))
    got = compat.value(ft, torch.tensor(o), torch.tensor(labels), logits=new_logits)

    # the queue after the second push: first batch rows 2, 3, then the current batch
    q_o = np.concatenate([first_o[2:], o])
    q_y = np.concatenate([first_y[2:], labels])
    q_emb, q_logits = unit(q_o), arcface_logits(q_o, q_y, w)
    emb, logits, ys = term.queue.contents()
    order = np.lexsort((emb[:, 0].numpy(), ys.numpy()))
    ref_order = np.lexsort((q_emb[:, 0], q_y))
    np.testing.assert_allclose(emb.numpy()[order], q_emb[ref_order], rtol=1e-12)
    np.testing.assert_allclose(logits.numpy()[order], q_logits[ref_order], rtol=1e-10)
    r1, r2 = reference_terms(f, o, new_logits.detach().numpy(), labels, q_emb, q_logits, q_y, 1.0)
    assert got.item() == pytest.approx(0.7 * r1 + 0.2 * r2, rel=1e-10)
    got.backward()
    assert ft.grad is not None and torch.isfinite(ft.grad).all() and ft.grad.abs().sum() > 0


def test_nccl_refuses_without_logits():
    term = NCCLLoss(lambda o, y: o, queue_size=8)
    with pytest.raises(ValueError, match="logits"):
        CompatLoss("nccl", term=term).value(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
