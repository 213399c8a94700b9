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
    "class_range",
    "all_gather_rows",
    "init_centres",
    "ParallelMarginHead",
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
                 class_start: int = 0, class_end: int | None = None, init_seed: int | None = None) -> None:
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
        if init_seed is None:
            self.weight = nn.Parameter(torch.empty(self.class_end - self.class_start, embedding_size))
            nn.init.normal_(self.weight, mean=0.0, std=0.01)
        else:
            self.weight = nn.Parameter(init_centres(self.class_start, self.class_end, embedding_size, init_seed))

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels ``[b]`` -> shard-local ``[b]`` (-1 where the class is in another shard)."""
        inside = (labels >= self.class_start) & (labels < self.class_end)
        return torch.where(inside, labels - self.class_start, torch.full_like(labels, -1))

    def cosine(self, embeddings: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``cos [b, C_shard]`` between normalised embeddings and normalised centres (``weight``:
        a subset of the rows instead of all of them).

        Computed in at least float32 even under autocast: a margin of 0.5 rad on fp16 cosines
        (3 significant digits) and a scale of 64 would round the target logit by ~0.06."""
        w = self.weight if weight is None else weight
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, w.dtype), torch.float32)
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(w.to(dtype), dim=1).T

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


# Rows of the class centres drawn per generator: the initial centres then depend only on the
# seed and the class, not on how the classes are split over ranks.
_INIT_BLOCK = 4096


def init_centres(class_start: int, class_end: int, embedding_size: int, seed: int) -> torch.Tensor:
    """Rows ``[class_start, class_end)`` of the seeded initial centres ``N(0, 0.01)``: float32
    ``[class_end - class_start, d]``, equal to the same rows of ``init_centres(0, C, d, seed)``.

    Rows are drawn in blocks of 4096 classes, each from its own generator seeded by
    ``(seed, block)``, so a rank materialises only the blocks its slice touches."""
    out = torch.empty(class_end - class_start, embedding_size)
    block = class_start // _INIT_BLOCK
    while block * _INIT_BLOCK < class_end:
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + block) % (2**63 - 1))
        # always a whole block: torch's CPU normal sampler draws differently for other sizes
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=g) * 0.01
        a, b = max(lo, class_start), min(hi, class_end)
        out[a - class_start:b - class_start] = rows[a - lo:b - lo]
        block += 1
    return out


def class_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous classes ``[start, end)`` rank ``rank`` of ``world`` holds: the first
    ``C mod world`` ranks hold one class more than the others."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(int(num_classes), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _AllGatherRows(torch.autograd.Function):
    """Forward: the rows of every rank, concatenated in rank order ``[world * b, ...]``.
    Backward: the gradient of the whole gathered tensor is summed over ranks (each rank's
    loss saw every row) and each rank keeps its own rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, grad_scale: float) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank, ctx.rows, ctx.scale = group, dist.get_rank(group), x.shape[0], grad_scale
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        total = grad.contiguous().clone()  # all_reduce is in place: autograd owns ``grad``
        dist.all_reduce(total, group=ctx.group)
        own = total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return (own * ctx.scale if ctx.scale != 1.0 else own), None, None


def all_gather_rows(x: torch.Tensor, group: Any = None, grad_scale: float = 1.0) -> torch.Tensor:
    """``x [b, ...]`` on each of ``world`` ranks (the same ``b`` everywhere) -> ``[world * b, ...]``
    in rank order, with a gradient: rank ``r`` receives ``grad_scale * sum_k dL_k/dx_r``.

    ``grad_scale = world`` undoes DDP's gradient average for a loss that is already the mean
    over the gathered rows (see :class:`ParallelMarginHead`). Without an initialised process
    group (or with one rank) ``x`` itself is returned."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)
    return _AllGatherRows.apply(x, group, float(grad_scale))


class ParallelMarginHead(nn.Module):
    """A model-parallel margin head: rank ``r`` of ``world`` holds the centres of the classes
    :func:`class_range` gives it, ``weight [C_r, d]``, and never exchanges them.

    Each step the embeddings ``[b, d]`` and labels ``[b]`` of all ranks are all-gathered
    (``[world * b, d]``), every rank computes the margin logits of all rows against its own
    centres, and :func:`sharded_cross_entropy` gives the exact softmax cross-entropy over all
    ``C`` classes (a max and a sum all-reduce of ``[world * b]`` per-row values). The loss is
    the mean over the ``world * b`` rows, identical on every rank; the centres' gradient is
    local; the embeddings' gradient flows back through the all-gather to the rank that
    produced each row. With ``world == 1`` this is the plain full-head cross-entropy.

    ``sample_rate < 1`` keeps, per step, the rank's positive classes plus a random subset of
    its other classes, ``ceil(sample_rate * C_r)`` columns in all (at least the positives),
    drawn from a generator seeded by ``(seed, step, class_start)``: the softmax runs over the
    kept columns of all ranks (Partial FC); the other centres get no gradient that step.

    ``grad_scale``: factor on the embeddings' gradient; ``world`` when the backbone's gradients
    are averaged by DDP afterwards (the loss is already the global mean, so the average would
    divide the backbone's gradient by ``world`` once too often).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: MarginFn, rank: int = 0, world: int = 1,
                 *, sample_rate: float = 1.0, seed: int = 0, group: Any = None, grad_scale: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        start, end = class_range(num_classes, rank, world)
        self.classifier = NormalizedClassifier(num_classes, embedding_size, margin, start, end, init_seed=seed)
        self.rank, self.world, self.group = int(rank), int(world), group
        self.sample_rate, self.seed, self.grad_scale = float(sample_rate), int(seed), float(grad_scale)

    @property
    def weight(self) -> nn.Parameter:
        return self.classifier.weight

    @property
    def class_start(self) -> int:
        return self.classifier.class_start

    @property
    def class_end(self) -> int:
        return self.classifier.class_end

    def _sample(self, local: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept local columns ``[k]`` (sorted) and the labels remapped to them ``[B]``."""
        n = self.class_end - self.class_start
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) * 10_007 + self.class_start)
        score = torch.rand(n, generator=g).to(local.device)
        pos = torch.unique(local[local >= 0])
        score[pos] = 2.0  # positives always kept
        k = min(n, max(math.ceil(self.sample_rate * n), int(pos.numel())))
        keep = torch.topk(score, k, sorted=False).indices.sort().values
        where = torch.searchsorted(keep, local.clamp(min=0))
        return keep, torch.where(local >= 0, where, torch.full_like(local, -1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Local ``embeddings [b, d]`` and global ``labels [b]`` -> the scalar loss over all ranks' rows."""
        emb = all_gather_rows(embeddings, self.group, self.grad_scale) if self.world > 1 else embeddings
        y = all_gather_rows(labels, self.group) if self.world > 1 else labels
        local = self.classifier.local_labels(y)
        weight = self.weight
        if self.sample_rate < 1.0:
            keep, local = self._sample(local, step)
            weight = weight[keep]
        logits = self.classifier.margin(self.classifier.cosine(emb, weight), local)
        reducer = Reducer.for_group(self.group) if self.world > 1 else Reducer()
        return sharded_cross_entropy(logits, local, reducer=reducer)
