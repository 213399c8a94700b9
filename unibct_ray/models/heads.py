"""Margin heads on normalised features and normalised class centres, and a sharded softmax.

Margin functions are pure: ``(cos [b, C], labels [b]) -> logits [b, C]`` (already scaled by
``s``). A label of ``-1`` means "this row's target is not among these columns" (another
shard holds it, or the row has no target): that row gets no margin, only the scale.
:class:`NormalizedClassifier` composes a margin function with class centres ``W [C, d]``,
optionally only the shard ``[class_start, class_end)`` of them; :func:`sharded_cross_entropy`
gives the exact softmax cross-entropy over all shards from per-shard logits, with the
reductions behind an injectable :class:`Reducer` (torch.distributed by default, identity on
one process).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MarginFn",
    "arcface",
    "cosface",
    "softmax_logits",
    "margin_function",
    "NormalizedClassifier",
    "Reducer",
    "sharded_cross_entropy",
]

MarginFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _target_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices with a target in these columns (label != -1) and their column indices."""
    rows = torch.nonzero(labels != -1, as_tuple=False).squeeze(1)
    return rows, labels[rows]


def _replace_targets(cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    # index_put on a fresh tensor (not on the caller's) keeps autograd through both parts.
    return cos.index_put((rows, cols), values.to(cos.dtype))


def arcface(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.5) -> torch.Tensor:
    """ArcFace logits (additive angular margin, insightface ``easy_margin=False``).

    For the target entry ``t = cos[i, y_i]`` (``y_i != -1``), with ``theta = acos(t)``::

        phi = cos(theta + m)        if t > th,  th = cos(pi - m)
        phi = t - mm                otherwise,  mm = sin(pi - m) * m

    (the fallback keeps the logit monotonic in ``theta`` once ``theta + m`` would pass ``pi``).
    Returns ``s * cos`` with the target entries replaced by ``s * phi``: ``[b, C]``.
    """
    rows, cols = _target_rows(labels)
    target = cos[rows, cols]
    th = math.cos(math.pi - m)
    mm = math.sin(math.pi - m) * m
    # Clamp inside acos: its derivative is infinite at +-1, and normalised dot products can
    # overshoot 1 by rounding.
    # fp16/bf16 (autocast) cannot represent 1 - 1e-6: do the trigonometry in at least fp32.
    if target.dtype != torch.float64:
        target = target.float()
    eps = 1e-7 if target.dtype == torch.float64 else 1e-6
    theta = torch.acos(target.clamp(-1.0 + eps, 1.0 - eps))
    phi = torch.where(target > th, torch.cos(theta + m), target - mm)
    return _replace_targets(cos, rows, cols, phi) * s


def cosface(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.4) -> torch.Tensor:
    """CosFace logits (additive cosine margin): target ``t -> t - m``, all times ``s``. ``[b, C]``."""
    rows, cols = _target_rows(labels)
    return _replace_targets(cos, rows, cols, cos[rows, cols] - m) * s


def softmax_logits(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0) -> torch.Tensor:
    """Plain normalised softmax: ``s * cos`` (labels unused; kept for a uniform signature)."""
    del labels
    return cos * s


def margin_function(name: str, s: float = 64.0, m: float | None = None) -> MarginFn:
    """A configured margin function by name: ``arcface`` (m default 0.5), ``cosface`` (0.4),
    ``softmax`` (no margin: ``m`` is ignored, so a config's margin need not be reset when only
    the head type changes)."""
    if name == "arcface":
        return functools.partial(arcface, s=s, m=0.5 if m is None else m)
    if name == "cosface":
        return functools.partial(cosface, s=s, m=0.4 if m is None else m)
    if name == "softmax":
        return functools.partial(softmax_logits, s=s)
    raise ValueError(f"unknown head {name!r}; valid choices: arcface, cosface, softmax")


class NormalizedClassifier(nn.Module):
    """Cosine classifier over (a shard of) the class centres, with a pluggable margin.

    ``logits = margin(normalize(emb) @ normalize(W).T, local_labels)`` with
    ``W [class_end - class_start, d]`` initialised N(0, 0.01). Global labels are mapped to
    shard-local ones (``y - class_start``, or -1 when outside ``[class_start, class_end)``).

    Args:
        num_classes: total number of classes ``C`` (over all shards).
        embedding_size: ``d``.
        margin: a :data:`MarginFn`, e.g. ``functools.partial(arcface, s=64, m=0.5)``.
        class_start, class_end: the shard held here (default: all classes).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: MarginFn,
                 class_start: int = 0, class_end: int | None = None) -> None:
        super().__init__()
        class_end = num_classes if class_end is None else class_end
        if not 0 <= class_start <= class_end <= num_classes:
            raise ValueError(
                f"class shard [{class_start}, {class_end}) is not inside [0, {num_classes})"
            )
        self.num_classes = int(num_classes)
        self.class_start = int(class_start)
        self.class_end = int(class_end)
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(self.class_end - self.class_start, embedding_size))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels ``[b]`` -> shard-local ``[b]`` (-1 where the class is in another shard)."""
        inside = (labels >= self.class_start) & (labels < self.class_end)
        return torch.where(inside, labels - self.class_start, torch.full_like(labels, -1))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``cos [b, C_shard]`` between normalised embeddings and normalised centres."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings [b, d]``, global ``labels [b]`` -> scaled, margined logits ``[b, C_shard]``."""
        return self.margin(self.cosine(embeddings), self.local_labels(labels))


def _dist_reducer(group: Any) -> "Reducer":
    import torch.distributed as dist

    def reduce(op: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            out = t.clone()  # all_reduce is in place; never touch the caller's tensor
            dist.all_reduce(out, op=op, group=group)
            return out
        return fn

    return Reducer(max_=reduce(dist.ReduceOp.MAX), sum_=reduce(dist.ReduceOp.SUM))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Reducer:
    """Element-wise reductions over the shards: ``max_`` and ``sum_`` map a tensor to its
    reduction over all participants (same shape). Identity = a single shard."""

    max_: Callable[[torch.Tensor], torch.Tensor] = _identity
    sum_: Callable[[torch.Tensor], torch.Tensor] = _identity

    @classmethod
    def for_group(cls, group: Any = None) -> "Reducer":
        """torch.distributed all_reduce over ``group`` when it is initialised with more than
        one rank; the identity otherwise (one process = the plain cross-entropy)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            return _dist_reducer(group)
        return cls()


class _ShardedCrossEntropy(torch.autograd.Function):
    """Forward: exact CE over all shards. Backward: ``(softmax - onehot) / b`` on the local
    columns only -- it needs no communication, because the global max and sum-exp are
    saved from the forward pass."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, reducer: Reducer) -> torch.Tensor:
        z = logits.detach()
        if z.dtype in (torch.float16, torch.bfloat16):  # logits under autocast: reduce in fp32
            z = z.float()
        b = z.shape[0]
        if z.shape[1] > 0:
            local_max = z.max(dim=1).values
        else:  # an empty shard contributes nothing
            local_max = torch.full((b,), float("-inf"), dtype=z.dtype, device=z.device)
        global_max = reducer.max_(local_max)
        exp = torch.exp(z - global_max[:, None])
        rows, cols = _target_rows(labels)
        target = torch.zeros(b, dtype=z.dtype, device=z.device)
        target[rows] = z[rows, cols] - global_max[rows]
        has_target = torch.zeros(b, dtype=z.dtype, device=z.device)
        has_target[rows] = 1.0
        # One sum all_reduce for the three per-row quantities (one round trip, not three).
        stats = reducer.sum_(torch.stack([exp.sum(dim=1), target, has_target], dim=1))
        bad = (stats[:, 2] != 1).nonzero().squeeze(1)
        if bad.numel():
            raise ValueError(
                f"sharded_cross_entropy: row {int(bad[0])} has its label in "
                f"{int(stats[bad[0], 2])} shards (expected exactly 1); labels must be in [0, C)"
            )
        sum_exp = stats[:, 0]
        loss = (torch.log(sum_exp) - stats[:, 1]).mean()
        ctx.save_for_backward(exp / sum_exp[:, None], rows, cols)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        prob, rows, cols = ctx.saved_tensors
        grad = prob.index_put((rows, cols), prob[rows, cols] - 1.0)
        grad = grad * (grad_out / prob.shape[0])
        return grad.to(ctx.logits_dtype), None, None


def sharded_cross_entropy(local_logits: torch.Tensor, local_labels: torch.Tensor, group: Any = None,
                          reducer: Reducer | None = None) -> torch.Tensor:
    """Exact softmax cross-entropy over classes split across shards.

    Each shard holds ``local_logits [b, C_k]`` (the same ``b`` rows on every shard, i.e. the
    embeddings were all-gathered) and ``local_labels [b]`` (-1 where the target is elsewhere).
    With ``M_i = max_k max_j z_kij`` (all_reduce MAX) and, in one all_reduce SUM,
    ``Z_i = sum_k sum_j exp(z_kij - M_i)`` and the target logit ``z_i,y - M_i``::

        loss = mean_i [ log Z_i - (z_i,y - M_i) ]

    The returned scalar is identical on every shard. Its gradient w.r.t. the local logits is
    ``(softmax - onehot) / b`` restricted to the local columns, so each shard's backward
    yields its own centres' gradient exactly; the embedding gradient is the *sum* over shards
    (what the backward of an all-gather does). With ``group=None`` and no initialised
    process group (or world size 1) this is ``F.cross_entropy``. ``reducer`` overrides the
    reductions (tests simulate shards in one process with it).
    """
    if local_logits.dim() != 2 or local_labels.shape != local_logits.shape[:1]:
        raise ValueError(
            f"expected logits [b, C] and labels [b], got {list(local_logits.shape)} and {list(local_labels.shape)}"
        )
    reducer = Reducer.for_group(group) if reducer is None else reducer
    return _ShardedCrossEntropy.apply(local_logits, local_labels, reducer)
