"""AdvBCT (Pan et al., "Boundary-aware backward-compatible representation via adversarial
learning", CVPR 2023): a point-to-set loss against elastic class boundaries of the old
feature space, and an adversarial loss that makes new and old embeddings indistinguishable.

Notation: ``f_hat``, ``o_hat`` normalised new / old embeddings, ``y`` labels.

* Class metadata, computed once from the normalised old features of the training set
  (:mod:`unibct_ray.compat.class_geometry`): centre ``c`` (mean, not re-normalised) and the
  inlier radius ``r_max`` (:func:`inlier_radius`: largest radius after removing 1.5 IQR
  outliers).
* Elastic boundary (:func:`elastic_radius`): a learnable ``w_c`` per class, initialised
  ``U(-1, 1)``; with the pivot ``t = 0.4``, ``r_eb = |r_max - t| * sigmoid(w_c)`` and
  ``radius = r_max + r_eb`` if ``r_max < t`` else ``r_max - r_eb``.
* ``L_p2s`` (:func:`point_to_set_loss`): the mean over the samples outside their class's
  boundary of ``||f_hat - c_y|| - radius_y``; classes with one sample or none are skipped.
  Paper weight 4.
* ``L_adv`` (:func:`adversarial_loss`): a discriminator ``Linear(d, 100) -> BatchNorm1d ->
  ReLU -> Linear(100, 2)`` classifies ``GRL(f_hat, a)`` as 0 and ``o_hat`` as 1 (NLL). The
  gradient reversal coefficient follows training progress ``p in [0, 1)``:
  ``a = 2 / (1 + exp(-10 p)) - 1`` (:func:`grl_coefficient`); the weight falls with the epoch,
  ``4 (E - e + 1) / E`` for epoch ``e = 1..E`` (:func:`adversarial_weight`).

``L_comp = L_p2s * 4 + L_adv * 4 (E - e + 1) / E`` (:class:`AdvBCTLoss`). The discriminator
and the ``w_c`` are trained with the model and saved in its checkpoint (:class:`AdvBCTModule`).
The public code does not run as committed; this follows the paper and the code's intent.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "inlier_radius",
    "elastic_radius",
    "point_to_set_loss",
    "grad_reverse",
    "grl_coefficient",
    "adversarial_weight",
    "Discriminator",
    "adversarial_loss",
    "AdvBCTModule",
    "AdvBCTLoss",
]


def inlier_radius(distances: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class's largest inlier radius -> (``r_max`` float64 ``[C]``, ``n_c`` int64 ``[C]``).

    Per class, the radii ``r`` (``distances`` of its rows) sorted ascending; with ``n >= 4``,
    ``q1 = r[n // 4]``, ``q3 = r[3n // 4]`` and the inliers are ``q1 - 1.5 IQR <= r <= q3 +
    1.5 IQR``; with ``n < 4`` every radius is an inlier. An absent class has ``r_max = 0``.
    """
    dist = np.asarray(distances, np.float64)
    lab = np.asarray(labels, np.int64)
    if dist.shape != lab.shape or dist.ndim != 1:
        raise ValueError(f"distances and labels must both be [n], got {dist.shape} and {lab.shape}")
    counts = np.bincount(lab, minlength=num_classes)[:num_classes].astype(np.int64)
    r_max = np.zeros(num_classes, np.float64)
    if lab.size == 0:
        return r_max, counts
    order = np.lexsort((dist, lab))
    r, y = dist[order], lab[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = counts[y]
    q1 = r[starts[y] + n // 4]
    q3 = r[starts[y] + (3 * n) // 4]
    iqr = q3 - q1
    inlier = (n < 4) | ((r >= q1 - 1.5 * iqr) & (r <= q3 + 1.5 * iqr))
    np.maximum.at(r_max, y[inlier], r[inlier])
    return r_max, counts


def elastic_radius(r_max: torch.Tensor, w: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """``[C]``: ``r_max + r_eb`` where ``r_max < t``, else ``r_max - r_eb``, with
    ``r_eb = |r_max - t| * sigmoid(w)``."""
    r_eb = (r_max - threshold).abs() * torch.sigmoid(w)
    return torch.where(r_max < threshold, r_max + r_eb, r_max - r_eb)


def point_to_set_loss(f: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor,
                      valid: torch.Tensor, count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      world: int = 1) -> torch.Tensor:
    """Mean over violating rows of ``||f_hat_i - c_{y_i}|| - radius_{y_i}`` (0 when none violates).

    ``f [b, d]`` (normalised here), ``centres [C, d]``, ``radius [C]``, ``valid bool [C]`` (a
    class with at most one old feature has no radius and is skipped). Computed with masks, so
    ``radius`` stays in the graph even when no row violates (DDP needs every parameter used).

    On ``world`` ranks whose gradients DDP averages, ``count_sum`` sums the number of violating
    rows over the ranks (an all-reduce): each rank returns ``world * local sum / global count``,
    whose average over the ranks is the one-process mean over the global batch's violating rows
    (a per-rank mean would weigh a rank with few violations like one with many)."""
    dist = torch.linalg.vector_norm(F.normalize(f, dim=1) - centres[labels].to(f.dtype), dim=1)
    excess = dist - radius[labels].to(f.dtype)
    violate = (valid[labels] & (excess > 0)).to(f.dtype)
    count = violate.sum().detach()
    if count_sum is not None:
        count = count_sum(count)
    return (excess * violate).sum() * world / count.clamp_min(1.0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: float) -> torch.Tensor:
        ctx.a = a
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.a * grad, None


def grad_reverse(x: torch.Tensor, a: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-a`` on the way back (GRL)."""
    return _GradReverse.apply(x, float(a))


def grl_coefficient(progress: float) -> float:
    """``a = 2 / (1 + exp(-10 p)) - 1`` for training progress ``p`` (0 at the first step, -> 1)."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


def adversarial_weight(epoch: int, epochs: int, base: float = 4.0) -> float:
    """``base * (E - e + 1) / E`` for the 0-based ``epoch`` (``e = epoch + 1``) of ``epochs``."""
    return base * (epochs - epoch) / epochs


class Discriminator(nn.Sequential):
    """``Linear(d, h) -> BatchNorm1d(h) -> ReLU -> Linear(h, 2)``: logits ``[n, 2]``."""

    def __init__(self, embedding_size: int, hidden: int = 100) -> None:
        super().__init__(nn.Linear(embedding_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def adversarial_loss(discriminator: Callable[[torch.Tensor], torch.Tensor], f: torch.Tensor, o: torch.Tensor,
                     a: float) -> torch.Tensor:
    """NLL of the discriminator on ``[GRL(f_hat, a); o_hat]`` labelled ``[0] * b + [1] * b``
    (one batch of ``2b`` rows, mean over them)."""
    x = torch.cat([grad_reverse(F.normalize(f, dim=1), a), F.normalize(o.detach(), dim=1).to(f.dtype)])
    target = torch.cat([torch.zeros(f.shape[0], dtype=torch.long), torch.ones(o.shape[0], dtype=torch.long)])
    logits = discriminator(x)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the softmax in at least fp32
    return F.nll_loss(F.log_softmax(logits, dim=1), target.to(x.device))


class AdvBCTModule(nn.Module):
    """AdvBCT's trained parts: the discriminator and the per-class radius parameters ``w [C]``,
    with the class metadata as (non-persistent) buffers: ``centres [C, d]``, ``r_max [C]``,
    ``valid bool [C]`` (``n_c >= 2``). ``forward`` returns ``[L_p2s, L_adv]`` from one call, so a
    DDP wrapper sees every parameter used.

    ``w`` is drawn ``U(-1, 1)`` from a generator seeded by ``seed`` (the same on every rank).
    ``count_sum``, ``world``: see :func:`point_to_set_loss` (DDP over ``world`` ranks)."""

    def __init__(self, centres: torch.Tensor, r_max: torch.Tensor, counts: torch.Tensor, hidden: int = 100,
                 threshold: float = 0.4, seed: int = 0,
                 count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, world: int = 1) -> None:
        super().__init__()
        self.count_sum, self.world = count_sum, int(world)
        c, d = centres.shape
        if r_max.shape != (c,) or counts.shape != (c,):
            raise ValueError(f"AdvBCTModule: centres {list(centres.shape)}, r_max {list(r_max.shape)} and counts "
                             f"{list(counts.shape)} disagree on the number of classes")
        self.threshold = float(threshold)
        self.discriminator = Discriminator(d, hidden)
        g = torch.Generator().manual_seed(int(seed) % (2**63 - 1))
        self.w = nn.Parameter(torch.rand(c, generator=g) * 2.0 - 1.0)
        self.register_buffer("centres", torch.as_tensor(centres, dtype=torch.float32), persistent=False)
        self.register_buffer("r_max", torch.as_tensor(r_max, dtype=torch.float32), persistent=False)
        self.register_buffer("valid", torch.as_tensor(counts) >= 2, persistent=False)

    def radius(self) -> torch.Tensor:
        """The current elastic radius of every class ``[C]``."""
        return elastic_radius(self.r_max, self.w, self.threshold)

    def forward(self, f: torch.Tensor, o: torch.Tensor, labels: torch.Tensor, a: float) -> torch.Tensor:
        f32 = f.to(torch.promote_types(f.dtype, torch.float32))
        p2s = point_to_set_loss(f32, labels, self.centres, self.radius(), self.valid, self.count_sum, self.world)
        adv = adversarial_loss(self.discriminator, f, o, a)
        return torch.stack([p2s.to(adv.dtype), adv])


class AdvBCTLoss:
    """``L_comp = p2s_weight * L_p2s + adversarial_weight(e) * L_adv`` with the GRL coefficient
    from training progress; :meth:`schedule` sets both for the coming step.

    ``module``: an :class:`AdvBCTModule`, or a DDP wrapper of one (its gradients are then
    averaged over ranks like the backbone's)."""

    def __init__(self, module: Callable[..., torch.Tensor], p2s_weight: float = 4.0, adv_weight: float = 4.0) -> None:
        self.module = module
        self.p2s_weight, self.adv_base = float(p2s_weight), float(adv_weight)
        self.a, self.adv_weight = 0.0, self.adv_base

    def schedule(self, step: int, total_steps: int, epoch: int, epochs: int) -> None:
        self.a = grl_coefficient(step / max(total_steps, 1))
        self.adv_weight = adversarial_weight(epoch, epochs, self.adv_base)

    def __call__(self, f: torch.Tensor, o: torch.Tensor | None, labels: torch.Tensor | None,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
        del logits
        if o is None or labels is None:
            raise ValueError("compat method 'advbct' needs the old embeddings o and the labels")
        p2s, adv = self.module(f, o, labels, self.a)
        return self.p2s_weight * p2s + self.adv_weight * adv
