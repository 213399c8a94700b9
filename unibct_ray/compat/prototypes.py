"""Class prototypes from old-model features: plain means and structural refinement (ARCHITECTURE §5).

For one class with ``n`` samples, ``O [n, d]`` old features and ``N [n, d]`` new-model features
of the same images (raw embeddings, not normalised)::

    S  = N_hat N_hat^T / tau,  S_ii = -inf          (tau = 0.05)
    P  = softmax over each row of S                  (axis="row": each sample aggregates
                                                      from its neighbours in the new model)
    O' = (1 - lam) (I - lam P)^-1 O                  (lam = 0.9)
    p  = normalize(mean over rows of O')

A class with one sample keeps ``normalize(O[0])``.

**Only the mean of O' is needed**, so instead of solving for all ``d`` columns of ``O'`` we
solve one linear system per class for the row weights ``u``::

    mean_rows(O') = (1 - lam) / n * 1^T (I - lam P)^-1 O = (1 - lam) / n * u^T O,
    (I - lam P)^T u = 1

and since ``p`` is normalised the positive factor ``(1 - lam) / n`` drops out: ``p =
normalize(u^T O)``. This is the same solve (never an explicit inverse), ``O(n^3)`` with one
right-hand side instead of ``O(n^3 + n^2 d)``.

``axis="column"`` (softmax over each column, as the public re-implementation does) makes
``1^T P = 1^T``, hence ``u = 1 / (1 - lam)`` and ``p = normalize(mean(O))``: it refines
nothing. It is kept only to reproduce that reference; a test proves the equality.

Numerics: ``I - lam P`` with a (row- or column-) stochastic ``P`` with zero diagonal is
strictly diagonally dominant (by rows resp. columns) with condition number at most
``(1 + lam) / (1 - lam) = 19`` in the matching norm, so the batched solve runs in float32
(default ``dtype``) and loses at most ~1.5 digits; the sums inside it run over at most ``n``
rows. Float64 is used where long sums happen: per-class sums over a whole data set
(:func:`partial_class_sums`), which distributed callers all-reduce before
:func:`means_from_sums`.

Absent classes (no row with that label): a zero prototype row by default
(``on_absent="zero"``; ``class_counts(labels, C) == 0`` identifies them, and a zero row gives
``cos = 0`` in :func:`unibct_ray.compat.losses.prototype_logits`), or ``ValueError`` with
``on_absent="raise"``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Axis",
    "class_counts",
    "partial_class_sums",
    "means_from_sums",
    "class_means",
    "refine_batch",
    "refine_prototypes",
    "refine_class_range",
    "class_offsets",
    "balanced_class_ranges",
    "DEFAULT_MAX_BATCH_BYTES",
]

Axis = Literal["row", "column"]
ArrayLike = torch.Tensor | np.ndarray

DEFAULT_MAX_BATCH_BYTES = 256 << 20


def _tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t


def _labels(labels: ArrayLike, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    lab = torch.as_tensor(labels)
    if lab.dim() != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} must be [n] with n = {n}, got {list(lab.shape)}")
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got {lab.dtype}")
    lab = lab.long()
    if n and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got min {int(lab.min())} max {int(lab.max())}"
        )
    return lab


def class_counts(labels: ArrayLike, num_classes: int) -> torch.Tensor:
    """Samples per class: ``int64 [C]`` (0 = absent class)."""
    lab = torch.as_tensor(labels).long()
    return torch.bincount(lab, minlength=num_classes)[:num_classes]


def partial_class_sums(features: ArrayLike, labels: ArrayLike, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums in float64 and counts: ``(sums [C, d] float64, counts [C] int64)``.

    Additive over disjoint parts of the data, so distributed callers all-reduce (SUM) both and
    finish with :func:`means_from_sums`; float64 keeps the sum over millions of rows exact to
    float32 precision whatever the reduction order.
    """
    feats = _tensor(features, "features")
    if feats.dim() != 2:
        raise ValueError(f"features must be [n, d], got {list(feats.shape)}")
    lab = _labels(labels, feats.shape[0], num_classes)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, lab.to(feats.device), feats.double())
    return sums, torch.bincount(lab, minlength=num_classes).to(feats.device)


def means_from_sums(sums: torch.Tensor, counts: torch.Tensor, normalize: bool = True,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sums [C, d] / counts [C]`` -> ``[C, d]`` (L2-normalised rows if ``normalize``);
    classes with count 0 give zero rows."""
    means = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
    if normalize:
        means = F.normalize(means, dim=1)
    return means.to(dtype)


def class_means(features: ArrayLike, labels: ArrayLike, num_classes: int, normalize: bool = True,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-class mean of ``features [n, d]`` -> ``[C, d]``, normalised if ``normalize``
    (the BCT synthesized centres and the unrefined prototypes). Absent classes: zero rows."""
    sums, counts = partial_class_sums(features, labels, num_classes)
    return means_from_sums(sums, counts, normalize=normalize, dtype=dtype)


def refine_batch(old: torch.Tensor, new: torch.Tensor, lam: float = 0.9, tau: float = 0.05,
                 axis: Axis = "row") -> torch.Tensor:
    """Refined prototypes of ``B`` classes of equal size ``n >= 2``: ``old, new [B, n, d] -> [B, d]``.

    ``p_b = normalize(u_b^T O_b)`` with ``(I - lam P_b)^T u_b = 1`` (see the module docstring).
    Computed in ``old.dtype``; the inputs are not modified.
    """
    if old.dim() != 3 or new.shape != old.shape:
        raise ValueError(f"refine_batch: expected old, new [B, n, d] of equal shape, got "
                         f"{list(old.shape)} and {list(new.shape)}")
    if old.shape[1] < 2:
        raise ValueError("refine_batch: classes need n >= 2 samples (n = 1 keeps its old feature)")
    return _prototypes_from_weights(_row_weights(F.normalize(new.to(old.dtype), dim=2), lam, tau, axis), old)


def _row_weights(new_hat: torch.Tensor, lam: float, tau: float, axis: Axis) -> torch.Tensor:
    """``u [B, n]`` with ``(I - lam P)^T u = 1`` from normalised new features ``[B, n, d]``.

    Peak: ``S`` and ``P`` (``2 B n^2``) during the softmax, then ``A`` and the solve's LU copy.
    """
    b, n, _ = new_hat.shape
    sim = torch.bmm(new_hat, new_hat.transpose(1, 2)).div_(tau)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    p = torch.softmax(sim, dim=2 if axis == "row" else 1)
    del sim
    a = p.mul_(-lam)
    a.diagonal(dim1=1, dim2=2).add_(1.0)
    # u^T = 1^T A^-1, i.e. solve X A = 1^T (left=False): a solve, never an inverse.
    return torch.linalg.solve(a, new_hat.new_ones(b, 1, n), left=False).squeeze(1)


def _prototypes_from_weights(u: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``normalize(u_b^T O_b)``: ``u [B, n]``, ``old [B, n, d]`` -> ``[B, d]``."""
    return F.normalize(torch.bmm(u.unsqueeze(1), old).squeeze(1), dim=1)


def _bytes_per_class(n: int, d: int, itemsize: int) -> int:
    # The gathered N (normalised in place) lives with S and P during the softmax, then A and
    # the solve's LU copy; the gathered O comes after N is freed. Bound: one n x d buffer plus
    # three n x n ones (counted as four for slack), and the int64 row indices.
    return (n * d + 4 * n * n) * itemsize + 8 * n


def refine_prototypes(old: ArrayLike, new: ArrayLike | None, labels: ArrayLike, num_classes: int,
                      lam: float = 0.9, tau: float = 0.05, axis: Axis = "row", refine: bool = True,
                      dtype: torch.dtype = torch.float32, on_absent: Literal["zero", "raise"] = "zero",
                      max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Structurally refined class prototypes ``[C, d]`` (L2-normalised rows), vectorised.

    Args:
        old: ``[n, d]`` old-model features (any float dtype, e.g. float16 storage; rows in any order).
        new: ``[n, d]`` new-model features of the same images, same row order (unused, may be
            None, when ``refine=False``).
        labels: ``int [n]`` classes in ``[0, num_classes)``.
        num_classes: ``C``.
        lam, tau: lambda and the temperature of §5 (0.9, 0.05).
        axis: ``"row"`` (ours) or ``"column"`` (the public re-implementation = plain mean).
        refine: False -> normalised plain class means of ``old`` (no refinement).
        dtype: compute/output dtype (float32 default; see the module docstring).
        on_absent: classes without rows -> zero rows (``"zero"``) or ``ValueError`` (``"raise"``).
        max_batch_bytes: memory budget of one batched solve.
        device: where the batched solves run (``"cuda"`` on a refinement actor given a GPU
            share); the inputs are copied there and the result comes back on the CPU.

    Classes are grouped by size ``n_c``; each size is one batched solve, chunked to
    ``B = max(1, max_batch_bytes // ((n d + 4 n^2) * itemsize + 8 n))`` classes. Peak memory of a
    call: the inputs, the output ``C * d * itemsize``, ``16 n_total`` bytes of labels and row
    order, plus per chunk ``B * ((n d + 4 n^2) * itemsize + 8 n)`` <= ``max(max_batch_bytes,
    one class)`` (the gathered ``N [B, n, d]`` with ``S``, ``P`` / ``A`` and the solve's LU copy
    ``[B, n, n]``; the gathered ``O [B, n, d]`` only after ``N`` is freed). float32, n = 600,
    d = 512: 7.0 MB per class, so 38 classes per 256 MiB chunk.
    Work: ``O(sum_c n_c^2 d + n_c^3)``.
    """
    if axis not in ("row", "column"):
        raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
    if on_absent not in ("zero", "raise"):
        raise ValueError(f"on_absent must be 'zero' or 'raise', got {on_absent!r}")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {lam}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    dev = torch.device(device)
    old_t = _tensor(old, "old")
    if old_t.dim() != 2:
        raise ValueError(f"old must be [n, d], got {list(old_t.shape)}")
    lab = _labels(labels, old_t.shape[0], num_classes)
    counts = torch.bincount(lab, minlength=num_classes)
    if on_absent == "raise" and bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).squeeze(1)
        raise ValueError(f"refine_prototypes: {missing.numel()} of {num_classes} classes have no rows "
                         f"(first: class {int(missing[0])})")
    if not refine:
        return class_means(old_t, lab, num_classes, normalize=True, dtype=dtype).cpu()
    if new is None:
        raise ValueError("refine_prototypes: refine=True needs the new-model features")
    new_t = _tensor(new, "new")
    if new_t.shape != old_t.shape:
        raise ValueError(f"old {list(old_t.shape)} and new {list(new_t.shape)} features differ in shape")
    # Everything below runs on ``dev`` (a no-op copy for CPU inputs on the CPU).
    old_t, new_t, lab, counts = old_t.to(dev), new_t.to(dev), lab.to(dev), counts.to(dev)

    d = old_t.shape[1]
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.zeros(num_classes, d, dtype=dtype, device=old_t.device)
    # Gather through a stable order instead of sorting copies of the (large) inputs.
    order = torch.argsort(lab, stable=True)
    offsets = torch.zeros(num_classes + 1, dtype=torch.long, device=old_t.device)
    offsets[1:] = torch.cumsum(counts, 0)
    for size in torch.unique(counts).tolist():
        if size == 0:
            continue
        classes = torch.nonzero(counts == size).squeeze(1)
        if size == 1:
            out[classes] = F.normalize(old_t[order[offsets[classes]]].to(dtype), dim=1)
            continue
        chunk = max(1, max_batch_bytes // _bytes_per_class(size, d, itemsize))
        steps = torch.arange(size, device=old_t.device)
        for start in range(0, classes.numel(), chunk):
            cls = classes[start:start + chunk]
            rows = order[offsets[cls][:, None] + steps].reshape(-1)  # B*n rows, class-major
            shape = (cls.numel(), size, d)
            # index_select is a plain row gather (faster than advanced indexing on CPU).
            n_b = new_t.index_select(0, rows).view(shape).to(dtype)
            # n_b is our own gathered copy: normalise it in place (one [B, n, d] buffer fewer).
            n_b.div_(torch.linalg.vector_norm(n_b, dim=2, keepdim=True).clamp_min_(1e-12))
            u = _row_weights(n_b, lam, tau, axis)
            del n_b
            o_b = old_t.index_select(0, rows).view(shape).to(dtype)
            out[cls] = _prototypes_from_weights(u, o_b)
            del o_b
    return out.cpu()


def refine_class_range(old: ArrayLike, new: ArrayLike | None, labels: ArrayLike, class_start: int,
                       class_end: int, **kwargs) -> torch.Tensor:
    """Prototypes of the classes ``[class_start, class_end)`` only: ``[class_end - class_start, d]``.

    ``old, new [m, d]`` and global ``labels [m]`` hold exactly the rows of that class range (in
    any order; a caller that sorted the data by label slices ``offsets[c0]:offsets[c1]`` with
    :func:`class_offsets`). This is what one refinement actor computes; concatenating the
    ranges of a partition of ``[0, C)`` gives :func:`refine_prototypes` over all classes.
    ``kwargs`` are those of :func:`refine_prototypes`.
    """
    if not 0 <= class_start <= class_end:
        raise ValueError(f"invalid class range [{class_start}, {class_end})")
    lab = torch.as_tensor(labels).long()
    if lab.numel() and (int(lab.min()) < class_start or int(lab.max()) >= class_end):
        raise ValueError(f"refine_class_range: labels span [{int(lab.min())}, {int(lab.max())}] "
                         f"outside the range [{class_start}, {class_end})")
    return refine_prototypes(old, new, lab - class_start, class_end - class_start, **kwargs)


def class_offsets(sorted_labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Row offsets ``int64 [C + 1]`` of each class in label-sorted data: class ``c`` is rows
    ``offsets[c]:offsets[c + 1]``, a class range ``[c0, c1)`` is ``offsets[c0]:offsets[c1]``."""
    lab = np.asarray(sorted_labels, dtype=np.int64)
    if lab.size and np.any(np.diff(lab) < 0):
        raise ValueError("class_offsets: labels are not sorted")
    return np.searchsorted(lab, np.arange(num_classes + 1), side="left").astype(np.int64)


def balanced_class_ranges(counts: ArrayLike, num_parts: int, d: int = 512) -> list[tuple[int, int]]:
    """Split ``[0, C)`` into ``num_parts`` contiguous class ranges of about equal work.

    Work of a class of size ``n``: ``n^2 d + n^3`` (``S`` and the solve); ``n <= 1`` costs ~0.
    Returns ``[(c0, c1), ...]`` covering ``[0, C)`` in order (a range may be empty when there are
    fewer classes than parts).
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    n = np.asarray(counts, dtype=np.float64)
    cost = np.where(n >= 2, n * n * d + n ** 3, 0.0) + 1.0  # +1: every class costs a little
    cum = np.cumsum(cost)
    total = cum[-1] if cum.size else 0.0
    cuts = [int(np.searchsorted(cum, total * k / num_parts, side="left")) + 1 for k in range(1, num_parts)]
    bounds = np.maximum.accumulate(np.clip([0, *cuts, n.size], 0, n.size))
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(num_parts)]
