"""MixBCT (Liang et al., "MixBCT: towards self-adapting backward-compatible training", 2023).

No compatibility loss: in each local batch some *credible* samples feed their normalised old
feature to the new margin head instead of their new embedding, and the head loss on that mixed
batch is the only loss. The old features pass through the trainable head, so the class centres
are pulled towards the old features and the new embeddings towards the centres.

* Credible: per class, the ``ceil(T * n_c)`` samples whose normalised old feature is closest to
  the class centre (:mod:`unibct_ray.compat.class_geometry`), ``T = 0.9``; computed once, before
  training, from the cached old features.
* Per step: ``k = round(ratio * b)`` positions (``ratio = 0.3``) drawn uniformly among the
  batch's credible rows. The public code fails when a batch has fewer credible rows than ``k``;
  here ``min(k, credible)`` positions are mixed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["credible_mask", "is_credible", "mix_count", "mix_positions", "mix_embeddings"]


def credible_mask(distances: np.ndarray, labels: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """``bool [n]``: row ``i`` is among the ``ceil(T * n_c)`` rows of its class closest to the
    class centre (``distances [n]``, from :func:`~unibct_ray.compat.class_geometry.distances_to_centres`).

    Ties are broken by row position. ``ceil`` is taken with a 1e-9 tolerance, so ``0.7 * 10``
    (7.000000000000001 in floating point) keeps 7 rows, not 8.
    """
    dist = np.asarray(distances, np.float64)
    lab = np.asarray(labels, np.int64)
    if dist.shape != lab.shape or dist.ndim != 1:
        raise ValueError(f"distances and labels must both be [n], got {dist.shape} and {lab.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = lab.shape[0]
    if n == 0:
        return np.zeros(0, bool)
    order = np.lexsort((np.arange(n), dist, lab))  # by class, then distance, then position
    counts = np.bincount(lab)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_lab = lab[order]
    rank = np.arange(n) - starts[sorted_lab]
    keep = np.ceil(threshold * counts - 1e-9).astype(np.int64)
    out = np.zeros(n, bool)
    out[order] = rank < keep[sorted_lab]
    return out


def mix_count(batch: int, credible: int, ratio: float = 0.3) -> int:
    """Rows mixed in a batch of ``batch`` with ``credible`` credible rows: ``min(round(ratio * b),
    credible)`` (Python's round, half to even)."""
    return min(int(round(ratio * batch)), int(credible))


def mix_positions(credible: torch.Tensor, ratio: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """``credible bool [b]`` -> ``bool [b]``: :func:`mix_count` positions drawn uniformly (without
    replacement) among the credible rows, from ``generator`` (a CPU generator; the result is on
    ``credible``'s device)."""
    cred = credible.detach().to("cpu", torch.bool)
    rows = torch.nonzero(cred, as_tuple=False).squeeze(1)
    k = mix_count(cred.shape[0], rows.numel(), ratio)
    out = torch.zeros_like(cred)
    if k:
        out[rows[torch.randperm(rows.numel(), generator=generator)[:k]]] = True
    return out.to(credible.device)


def mix_embeddings(emb: torch.Tensor, old: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``emb [b, d]`` with the rows at ``positions bool [b]`` replaced by ``normalize(old) [b, d]``
    (a new tensor; the replaced rows carry no gradient to ``emb``)."""
    if old.shape != emb.shape or positions.shape != emb.shape[:1]:
        raise ValueError(f"mix_embeddings: emb {list(emb.shape)}, old {list(old.shape)} and positions "
                         f"{list(positions.shape)} do not match")
    # normalised in at least float32 (emb may be fp16 under autocast)
    o = F.normalize(old.detach().to(torch.promote_types(emb.dtype, torch.float32)), dim=1).to(emb.dtype)
    return torch.where(positions.to(emb.device).view(-1, 1), o, emb)



def is_credible(index: torch.Tensor, credible_index: torch.Tensor) -> torch.Tensor:
    """``bool [b]``: whether each record ``index [b]`` is in ``credible_index`` (sorted int64,
    the record indices :func:`credible_mask` kept); on ``index``'s device."""
    idx = index.detach().to("cpu", torch.int64)
    if credible_index.numel() == 0:
        return torch.zeros(idx.shape, dtype=torch.bool, device=index.device)
    pos = torch.searchsorted(credible_index, idx).clamp(max=credible_index.numel() - 1)
    return (credible_index[pos] == idx).to(index.device)
