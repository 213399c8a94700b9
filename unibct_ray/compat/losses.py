"""Backward-compatibility losses (ARCHITECTURE §4).

Notation: ``f [b, d]`` new-model embeddings, ``o [b, d]`` old-model embeddings of the same
images (pre-extracted, constants), hats are L2-normalised rows. The training objective is
``head loss + w * L_comp``.

* ``independent``: ``w = 0`` (the incompatible reference).
* ``l2``: ``L = mean_i max(||o_hat_i - f_hat_i||_2 - t, 0)`` (t = 0; 0.2 is the "weakened"
  variant); paper weight 10.
* ``bct`` (influence loss): cross-entropy of ``f`` against the frozen old classifier --
  old centres for classes the old model knows, normalised class means of old features for the
  rest (:func:`bct_prototypes`).
* ``unibct``: cross-entropy of ``f`` against refined prototypes
  (:mod:`unibct_ray.compat.prototypes`); ``w = 0`` until the first refinement epoch.
* ``nccl``: neighbourhood-consensus contrast against a queue of old embeddings and old logits
  (:mod:`unibct_ray.compat.nccl`); needs the head's logits.
* ``advbct``: point-to-set loss against elastic class boundaries plus an adversarial loss
  (:mod:`unibct_ray.compat.advbct`).
* ``mixbct``: no ``L_comp`` (``w = 0``); the method mixes old features into the head's input
  (:mod:`unibct_ray.compat.mixbct`, applied by the training step).

nccl and advbct hold state across steps (a queue; a discriminator and radii trained with the
model), built by the training loop and passed in as ``term``.

Both prototype losses use ``z_c = s * cos(f, p_c)`` with ``s = 30`` by default. The public
re-implementation feeds unscaled cosines (``|z| <= 1``) to the softmax, which over 65-93k
classes is nearly uniform and gives almost no gradient; ``s`` is exposed for that reason.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unibct_ray.models.heads import arcface

__all__ = [
    "COMPAT_METHODS",
    "DEFAULT_WEIGHTS",
    "TERM_METHODS",
    "l2_compat_loss",
    "prototype_logits",
    "prototype_loss",
    "bct_prototypes",
    "CompatLoss",
]

COMPAT_METHODS = ("independent", "l2", "bct", "unibct", "nccl", "advbct", "mixbct")
# The paper's weights: l2 is weighted 10, the classification-style losses 1. nccl and advbct
# weigh their own terms (alpha/beta; 4 and 4 (E - e + 1) / E); mixbct has no L_comp.
DEFAULT_WEIGHTS = {"independent": 0.0, "l2": 10.0, "bct": 1.0, "unibct": 1.0, "nccl": 1.0, "advbct": 1.0,
                   "mixbct": 0.0}
# Methods whose L_comp is a stateful term built by the training loop.
TERM_METHODS = ("nccl", "advbct")
# Called as term(f, o, labels, logits) -> L_comp; optionally term.schedule(step, total, epoch, epochs).
Term = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def l2_compat_loss(f: torch.Tensor, o: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``mean_i max(||o_hat_i - f_hat_i||_2 - margin, 0)`` for ``f, o [b, d]`` -> scalar."""
    if f.shape != o.shape:
        raise ValueError(f"l2_compat_loss: f {list(f.shape)} and o {list(o.shape)} differ")
    dist = torch.linalg.vector_norm(F.normalize(o, dim=1) - F.normalize(f, dim=1), dim=1)
    return torch.clamp(dist - margin, min=0.0).mean()


def prototype_logits(f: torch.Tensor, prototypes: torch.Tensor, s: float = 30.0, m: float = 0.0,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """``z [b, C]``: ``z_c = s * cos(f, p_c)``; with ``m > 0`` the target logit becomes
    ``s * cos(theta_y + m)`` (ArcFace, see :func:`unibct_ray.models.heads.arcface`).

    ``prototypes [C, d]`` are re-normalised here (cheap; all-zero rows -- absent classes --
    give ``cos = 0``). ``labels [b]`` are needed only when ``m > 0``.
    """
    cos = F.normalize(f, dim=1) @ F.normalize(prototypes.to(f.dtype), dim=1).T
    if m > 0:
        if labels is None:
            raise ValueError("prototype_logits: a margin m > 0 needs the labels")
        return arcface(cos, labels, s=s, m=m)
    return cos * s


def prototype_loss(f: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, s: float = 30.0,
                   m: float = 0.0) -> torch.Tensor:
    """Cross-entropy of :func:`prototype_logits` against ``labels [b]`` -> scalar (bct, unibct)."""
    return F.cross_entropy(prototype_logits(f, prototypes, s=s, m=m, labels=labels), labels)


def bct_prototypes(old_centres: torch.Tensor | None, class_map: np.ndarray | None,
                   class_mean_old_features: torch.Tensor) -> torch.Tensor:
    """The frozen "old classifier" of the BCT influence loss, one row per new class: ``[C_new, d]``.

    ``p_c = normalize(old_centres[class_map[c]])`` when the old model knows new class ``c``
    (``class_map[c] >= 0``), else ``normalize(class_mean_old_features[c])`` (a synthesized
    centre: the mean of the old features of that class on the new training set).

    Args:
        old_centres: ``[C_old, d]`` trained old class centres, or None (old model knows no class).
        class_map: ``int [C_new]`` old class index of each new class, -1 for unseen; None = all unseen.
        class_mean_old_features: ``[C_new, d]`` per-class means (normalised or not) of old features.
    """
    means = torch.as_tensor(class_mean_old_features)
    c_new = means.shape[0]
    cmap = np.full(c_new, -1, dtype=np.int64) if class_map is None else np.asarray(class_map, dtype=np.int64)
    if cmap.shape != (c_new,):
        raise ValueError(f"bct_prototypes: class_map has shape {cmap.shape}, expected ({c_new},)")
    out = F.normalize(means.float(), dim=1)
    known = np.nonzero(cmap >= 0)[0]
    if known.size:
        if old_centres is None:
            raise ValueError(f"bct_prototypes: class_map maps {known.size} classes to old classes "
                             "but old_centres is None")
        centres = torch.as_tensor(old_centres)
        if int(cmap.max()) >= centres.shape[0] or centres.shape[1] != means.shape[1]:
            raise ValueError(
                f"bct_prototypes: class_map refers to old class {int(cmap.max())} but old_centres is "
                f"{list(centres.shape)} (features {list(means.shape)})"
            )
        idx = torch.from_numpy(known)
        out = out.index_put((idx.to(out.device),),
                            F.normalize(centres[torch.from_numpy(cmap[known])].float(), dim=1).to(out.device))
    return out


class CompatLoss(nn.Module):
    """One compatibility method chosen by config; ``forward`` returns ``w * L_comp``.

    Args:
        method: one of :data:`COMPAT_METHODS`.
        weight: ``w``; None = the paper's (:data:`DEFAULT_WEIGHTS`); ``independent`` and
            ``mixbct`` are always 0.
        l2_margin: ``t`` of the l2 loss (0, or 0.2 for the weakened variant).
        scale: ``s`` of the prototype logits (bct / unibct).
        margin: additive angular margin on the prototype target (bct / unibct), 0 = none.
        term: the stateful ``L_comp`` of nccl / advbct (:class:`~unibct_ray.compat.nccl.NCCLLoss`,
            :class:`~unibct_ray.compat.advbct.AdvBCTLoss`), required for those methods.
    """

    def __init__(self, method: str, weight: float | None = None, l2_margin: float = 0.0,
                 scale: float = 30.0, margin: float = 0.0, term: Term | None = None) -> None:
        super().__init__()
        if method not in COMPAT_METHODS:
            raise ValueError(f"unknown compatibility method {method!r}; valid choices: {', '.join(COMPAT_METHODS)}")
        if method in TERM_METHODS and term is None:
            raise ValueError(f"compat method {method!r} needs its term (its queue or its trained parts)")
        self.method = method
        w = DEFAULT_WEIGHTS[method] if weight is None else float(weight)
        self.weight = 0.0 if method in ("independent", "mixbct") else w
        self.l2_margin = float(l2_margin)
        self.scale = float(scale)
        self.margin = float(margin)
        self.term = term

    @classmethod
    def from_section(cls, section: Any, term: Term | None = None) -> "CompatLoss":
        """From an object with ``method, weight, l2_margin, scale, margin`` (the config's
        ``compat`` section)."""
        return cls(section.method, weight=section.weight, l2_margin=section.l2_margin,
                   scale=section.scale, margin=section.margin, term=term)

    def schedule(self, step: int, total_steps: int, epoch: int, epochs: int) -> None:
        """Tell a scheduled term (advbct: GRL coefficient, epoch weight) where training is."""
        fn = getattr(self.term, "schedule", None)
        if fn is not None:
            fn(step, total_steps, epoch, epochs)

    def weight_at(self, epoch: int, refine_epochs: Sequence[int] = ()) -> float:
        """``w`` in effect during ``epoch`` (same numbering as ``refine_epochs``).

        unibct: 0 before the first refinement epoch, ``w`` from it on (refinement runs at the
        *start* of that epoch, so the epoch itself already trains against the prototypes);
        raises ``ValueError`` when ``refine_epochs`` is empty (it would silently train an
        independent model). l2 / bct / nccl / advbct: always ``w``; independent, mixbct: 0.
        """
        if self.method != "unibct":
            return self.weight
        if not refine_epochs:
            raise ValueError("compat method 'unibct' needs at least one refinement epoch (refine_epochs is empty)")
        return self.weight if epoch >= min(refine_epochs) else 0.0

    def value(self, f: torch.Tensor, o: torch.Tensor | None = None, labels: torch.Tensor | None = None,
              prototypes: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The unweighted ``L_comp`` (scalar; 0 for independent and mixbct). ``logits [b, C]``:
        the margin head's output for ``f`` (nccl)."""
        if self.method in ("independent", "mixbct"):
            return f.new_zeros(())
        if self.method in TERM_METHODS:
            return self.term(f, o, labels, logits)
        if self.method == "l2":
            if o is None:
                raise ValueError("compat method 'l2' needs the old embeddings o")
            return l2_compat_loss(f, o, margin=self.l2_margin)
        if labels is None or prototypes is None:
            raise ValueError(f"compat method {self.method!r} needs labels and prototypes")
        return prototype_loss(f, prototypes, labels, s=self.scale, m=self.margin)

    def forward(self, f: torch.Tensor, o: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                prototypes: torch.Tensor | None = None, weight: float | None = None,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """``w * L_comp`` (scalar). ``weight`` overrides ``self.weight`` (pass
        :meth:`weight_at`'s value); when the weight is 0 nothing is computed -- prototypes may
        then be None (unibct before its first refinement)."""
        w = self.weight if weight is None else float(weight)
        if w == 0.0:
            return f.new_zeros(())
        return w * self.value(f, o=o, labels=labels, prototypes=prototypes, logits=logits)
