"""What each part of a run asks Ray for, in one place (Ray-free).

The training loop, the extraction and refinement actors and the resource plan all read these
functions, so the plan checks exactly the requests the run will make.

GPU sharing: with ``use_gpu`` a train worker asks for ``1 - extract_gpus`` of a GPU and an
extraction or refinement actor for ``extract_gpus``. Ray never splits one fractional request
over two devices and two workers' shares (> 0.5 each) never fit on one device, so every
worker still owns a GPU of its own, and one actor fits beside it. That lets rank 0 drive an
extraction pass on the GPUs while the workers wait at a refinement epoch, without a deadlock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unibct_ray.config import TrainConfig

__all__ = ["train_worker_resources", "extract_actor_resources", "refine_actor_resources",
           "decode_task_resources"]


def train_worker_resources(cfg: "TrainConfig") -> dict[str, float]:
    """One Ray Train worker: ``{"CPU": cpus_per_worker[, "GPU": 1 - extract_gpus]}``."""
    out = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        out["GPU"] = 1.0 - float(cfg.extract_gpus)
    return out


def extract_actor_resources(cfg: "TrainConfig", cpus: float | None = None) -> dict[str, float]:
    """One feature-extraction actor. ``cpus`` overrides ``extract_cpus`` (an in-loop pass on a
    small machine takes what the workers leave)."""
    out = {"CPU": float(cfg.extract_cpus if cpus is None else cpus)}
    if cfg.use_gpu:
        out["GPU"] = float(cfg.extract_gpus)
    return out


def refine_actor_resources(cfg: "TrainConfig") -> dict[str, float]:
    """One prototype-refinement actor (one CPU; the batched solves on a GPU share with use_gpu)."""
    out = {"CPU": 1.0}
    if cfg.use_gpu:
        out["GPU"] = float(cfg.extract_gpus)
    return out


def decode_task_resources(cfg: "TrainConfig") -> dict[str, float]:
    """One Ray Data read/decode task of the training ingest."""
    return {"CPU": float(cfg.decode_cpus)}
