"""One optimisation step, free of Ray: the same function serves one process and DDP workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unibct_ray.compat.losses import CompatLoss

__all__ = ["StepResult", "train_step"]


@dataclass(frozen=True)
class StepResult:
    loss: float
    head_loss: float
    compat_loss: float


def train_step(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    compat: "CompatLoss | None" = None,
    weight: float = 0.0,
    old_features: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    clip_params: list[torch.nn.Parameter] | None = None,
    clip_norm: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_device: str | None = None,
) -> StepResult:
    """``loss = CE(head(emb), y) + weight * compat(emb, old, y, prototypes)``; one SGD step.

    ``module(x, labels) -> (emb [b, d], logits [b, C])``. Under DDP the gradients are averaged
    over workers, so with the per-worker mean loss the step equals one process on the
    concatenated batch (BatchNorm statistics aside). Gradient clipping happens after the
    average, on ``clip_params`` (the backbone).
    """
    with torch.autocast(autocast_device or x.device.type, dtype=torch.float16, enabled=autocast_device is not None):
        emb, logits = module(x, labels)
        head_loss = F.cross_entropy(logits.float(), labels)
        comp = emb.new_zeros((), dtype=torch.float32)
        if weight > 0 and compat is not None:
            comp = compat.value(emb.float(), old_features, labels, prototypes)  # unweighted L_comp
        loss = head_loss + weight * comp
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_norm > 0 and clip_params:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_norm > 0 and clip_params:
            torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
        optimizer.step()
    return StepResult(float(loss.detach()), float(head_loss.detach()), float(comp.detach()))
