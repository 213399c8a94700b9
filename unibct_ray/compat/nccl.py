"""NCCL (Wu et al., "Neighborhood consensus contrastive learning for backward-compatible
representation", AAAI 2022): contrast each new embedding with a queue of old embeddings, and
each sample's logits with the queue's old logits, weighted by old-space agreement.

Per step the old embeddings ``o`` of the batch go through the *new* margin head (margin on the
target, the head's scale; detached): old logits. A FIFO :class:`FeatureQueue` of ``Q`` entries
(8192) holds normalised old embeddings ``q_j``, old logits ``z_j`` and labels of the latest
global batches; it is updated *before* the loss, so it always holds the current batch. For a
local sample ``i`` with ``P(i) = {j : y_j = y_i}`` and ``w_ij = (o_hat_i . q_j + 1) / 2``::

    l1 = -mean_i [ sum_{j in P(i)} w_ij log softmax_j( f_hat_i . q_j / tau ) ] / |P(i)|
    l2 = the same with new_logits_i . z_j in place of f_hat_i . q_j
    L_comp = alpha * l1 + beta * l2          (alpha = 1, beta = 0.01, tau = 1)

On several ranks the batch's old embeddings and labels are all-gathered (``gather``) and every
rank computes the old logits of the gathered rows with its own copy of the replicated head: the
copies are equal, so the queue is the same on every rank while only ``[B, d]`` crosses the
network, not ``[B, C]``. The public code clamps the scaled logits to [-1, 1] under fp16; here
the scores are computed in float32 and not clamped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["FeatureQueue", "consensus_loss", "nccl_loss", "NCCLLoss"]


class FeatureQueue:
    """A FIFO ring of the last ``size`` rows of (embedding ``[d]``, logits ``[C]``, label).

    :meth:`push` writes rows in order, overwriting the oldest; :meth:`contents` returns the
    filled rows (their order in storage does not matter to the loss)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = int(size)
        self.emb: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.ptr = 0
        self.filled = 0

    def push(self, emb: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``emb [B, d]``, ``logits [B, C]``, ``labels [B]`` (detached copies)."""
        if not emb.shape[0] == logits.shape[0] == labels.shape[0]:
            raise ValueError(f"queue push: {emb.shape[0]}, {logits.shape[0]} and {labels.shape[0]} rows differ")
        emb, logits, labels = emb.detach()[-self.size:], logits.detach()[-self.size:], labels.detach()[-self.size:]
        if self.emb is None:
            self.emb = emb.new_zeros((self.size, emb.shape[1]))
            self.logits = logits.new_zeros((self.size, logits.shape[1]))
            self.labels = labels.new_full((self.size,), -1)
        rows = (self.ptr + torch.arange(emb.shape[0], device=emb.device)) % self.size
        self.emb[rows] = emb.to(self.emb.dtype)
        self.logits[rows] = logits.to(self.logits.dtype)
        self.labels[rows] = labels.to(self.labels.dtype)
        self.ptr = (self.ptr + emb.shape[0]) % self.size
        self.filled = min(self.size, self.filled + emb.shape[0])

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(emb [n, d], logits [n, C], labels [n])`` of the ``n`` filled rows."""
        if self.emb is None:
            raise ValueError("the queue is empty")
        return self.emb[:self.filled], self.logits[:self.filled], self.labels[:self.filled]


def consensus_loss(scores: torch.Tensor, weights: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """``-mean_i sum_j same_ij w_ij log softmax_j(scores_i) / sum_j same_ij`` for ``scores,
    weights [b, n]`` and ``same bool [b, n]`` (rows without a positive contribute 0)."""
    logp = F.log_softmax(scores, dim=1)
    pos = same.to(scores.dtype)
    per_row = -(weights * pos * logp).sum(dim=1) / pos.sum(dim=1).clamp_min(1.0)
    return per_row.mean()


def nccl_loss(f: torch.Tensor, o: torch.Tensor, new_logits: torch.Tensor, labels: torch.Tensor,
              queue_emb: torch.Tensor, queue_logits: torch.Tensor, queue_labels: torch.Tensor,
              tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l1, l2)`` of the local batch against the queue (see the module docstring).

    ``f, o [b, d]`` new / old embeddings (normalised here), ``new_logits [b, C]``, ``labels [b]``;
    ``queue_emb [n, d]`` normalised old embeddings, ``queue_logits [n, C]``, ``queue_labels [n]``."""
    f_hat, o_hat = F.normalize(f, dim=1), F.normalize(o.detach(), dim=1)
    q = queue_emb.to(f.dtype)
    weights = (o_hat @ q.T + 1.0) / 2.0
    same = labels[:, None] == queue_labels[None, :]
    l1 = consensus_loss(f_hat @ q.T / tau, weights, same)
    l2 = consensus_loss(new_logits @ queue_logits.to(new_logits.dtype).T / tau, weights, same)
    return l1, l2


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class NCCLLoss:
    """``alpha * l1 + beta * l2`` with its queue; called once per step, it pushes the step's
    global batch first.

    Args:
        old_logits: ``(o [B, d], labels [B]) -> [B, C]``: the new model's margin head (the
            replicated one: every rank must hold all ``C`` centres).
        gather: ``[b, ...] -> [B, ...]``, the rows of every rank in rank order (an all-gather);
            the identity on one process.
    """

    def __init__(self, old_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], queue_size: int = 8192,
                 alpha: float = 1.0, beta: float = 0.01, tau: float = 1.0,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.old_logits = old_logits
        self.queue = FeatureQueue(queue_size)
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.gather = gather or _identity

    def __call__(self, f: torch.Tensor, o: torch.Tensor | None, labels: torch.Tensor | None,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
        if o is None or labels is None or logits is None:
            raise ValueError("compat method 'nccl' needs the old embeddings o, the labels and the head's logits "
                             "(the replicated head: head.parallel false)")
        dtype = torch.promote_types(o.dtype, torch.float32)  # the queue in at least float32
        with torch.no_grad():
            o_all = self.gather(o.detach().to(dtype).contiguous())
            y_all = self.gather(labels.contiguous())
            self.queue.push(F.normalize(o_all, dim=1), self.old_logits(o_all, y_all).to(dtype), y_all)
        q_emb, q_logits, q_labels = self.queue.contents()
        l1, l2 = nccl_loss(f, o, logits, labels, q_emb, q_logits, q_labels, self.tau)
        return self.alpha * l1 + self.beta * l2
