"""One optimisation step, free of Ray: the same function serves one process and DDP workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from unibct_ray.compat.losses import CompatLoss

__all__ = ["StepResult", "train_step", "NonFiniteLoss", "NonFiniteGuard", "device_images"]


def device_images(images: torch.Tensor, flip: torch.Tensor | None = None, *,
                  channels_last: bool = False) -> torch.Tensor:
    """Decoded pixels on the training device -> the network's input.

    ``images``: uint8 ``[b, 3, S, S]`` (or float32 already normalised, returned as is);
    ``flip``: bool ``[b]``, mirror those rows horizontally. Returns float32 ``[b, 3, S, S]``,
    ``(x - 127.5) / 127.5`` (``unibct_ray.data.images``), in ``channels_last`` memory format
    when asked. Doing this here, not in the decode tasks, moves a quarter of the bytes
    through the object store and host-to-device copies.
    """
    from unibct_ray.data.images import PIXEL_MEAN, PIXEL_STD

    if images.dtype == torch.uint8:
        x = images.float()
        if flip is not None:
            x = torch.where(flip.to(torch.bool).view(-1, 1, 1, 1), x.flip(-1), x)
        x = (x - PIXEL_MEAN) / PIXEL_STD
    else:
        x = images
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass(frozen=True)
class StepResult:
    loss: float
    head_loss: float
    compat_loss: float
    applied: bool = True          # False: a loss term was NaN/inf and the update was skipped
    bad_term: str = ""            # "head", "compat" or "peer" (another DDP rank's) when not applied


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss: the run diverged and stops."""


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; raises after ``limit`` of them.

    One skipped step is survivable (a bad batch, an fp16 overflow the scaler did not catch);
    a run that keeps producing NaN has diverged, and training on would only write NaN
    checkpoints. ``limit`` 0 stops at the first non-finite loss.
    """

    def __init__(self, limit: int, name: str = "run"):
        self.limit, self.name, self.run = int(limit), name, 0

    def update(self, r: StepResult, step: int, epoch: int) -> None:
        if r.applied:
            self.run = 0
            return
        self.run += 1
        if self.run > self.limit:
            what = {"head": f"the head loss is {r.head_loss}", "compat": f"the compatibility loss is {r.compat_loss}",
                    "peer": "another worker's loss is NaN/inf"}.get(r.bad_term, "the loss is NaN/inf")
            raise NonFiniteLoss(
                f"{self.name}: {what} at step {step} (epoch {epoch + 1}), "
                f"{self.run} non-finite steps in a row (optim.nonfinite_steps = {self.limit}); the run diverged: "
                "lower optim.lr or the compatibility weight, and resume from the last checkpoint")


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
    agree: Callable[[bool], bool] | None = None,
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype = torch.float16,
    mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """``loss = CE(head(mix(emb)), y) + weight * compat(emb, old, y, prototypes, logits)``; one SGD step.

    ``module(x, labels) -> (emb [b, d], logits [b, C])``. Under DDP the gradients are averaged
    over workers, so with the per-worker mean loss the step equals one process on the
    concatenated batch (BatchNorm statistics aside). Gradient clipping happens after the
    average, on ``clip_params`` (the backbone).

    With ``head`` (a model-parallel head, kept outside DDP), ``module(x) -> emb [b, d]`` and
    ``head(emb, labels) -> head loss``; the head's parameters must be in ``optimizer`` too. A
    GradScaler then sees inf/NaN gradients of the local centres only, so the ranks agree
    (``agree``) on the overflow before unscaling, and all skip or all step together.

    ``amp_dtype``: the autocast dtype (float16 with a ``scaler``, or bfloat16 without one).

    ``mix``: ``emb [b, d] -> [b, d]`` applied to the head's input only (MixBCT feeds some rows'
    old features to the head); the module is then called as ``module(x, labels, mix=mix)``.
    The compatibility term sees the unmixed ``emb`` and, without ``head``, the head's logits.

    A NaN/inf head or compatibility loss skips the update (no backward, no optimizer step) and
    returns ``applied=False``; ``agree(local_ok) -> all_ok`` makes every DDP rank take the same
    decision (a rank that skipped its backward while the others ran theirs would hang DDP's
    all-reduce), e.g. an all-reduce of the flag with MIN. The caller counts skipped steps
    (:class:`NonFiniteGuard`).
    """
    with torch.autocast(autocast_device or x.device.type, dtype=amp_dtype, enabled=autocast_device is not None):
        logits = None
        if head is None:
            emb, logits = module(x, labels) if mix is None else module(x, labels, mix=mix)
            head_loss = F.cross_entropy(logits.float(), labels)
        else:
            emb = module(x)
            head_loss = head(emb if mix is None else mix(emb), labels)
        comp = emb.new_zeros((), dtype=torch.float32)
        if weight > 0 and compat is not None:
            comp = compat.value(emb.float(), old_features, labels, prototypes,  # unweighted L_comp
                                logits=None if logits is None else logits.float())
        loss = head_loss + weight * comp
    head_ok, comp_ok = bool(torch.isfinite(head_loss)), bool(torch.isfinite(comp))
    ok = head_ok and comp_ok
    if agree is not None:
        ok = agree(ok)
    if not ok:
        optimizer.zero_grad(set_to_none=True)
        bad = "head" if not head_ok else ("compat" if not comp_ok else "peer")
        return StepResult(float(loss.detach()), float(head_loss.detach()), float(comp.detach()),
                          applied=False, bad_term=bad)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if head is not None and agree is not None:
            finite = all(bool(torch.isfinite(p.grad).all()) for g in optimizer.param_groups
                         for p in g["params"] if p.grad is not None)
            if not agree(finite):
                # another rank's centres overflowed: make this rank's unscale_ see it too, so
                # every rank skips the step and lowers its scale alike
                next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.fill_(float("inf"))
        scaler.unscale_(optimizer)
        if clip_norm > 0 and clip_params:
            torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_norm > 0 and clip_params:
            torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
        optimizer.step()
    return StepResult(float(loss.detach()), float(head_loss.detach()), float(comp.detach()))
