"""Class prototypes across the cluster: class means and structural refinement on Ray actors.

Classes are independent (ARCHITECTURE §5), so the classes are cut into contiguous ranges of
about equal cost (sum of n_c^2 d + n_c^3 per range) and each range goes to one actor. An actor
reads only the rows of its range (feature shards are in class order, so Parquet row-group
statistics skip the rest), solves its classes in size-batched solves and returns [c1-c0, d].
The actors are placed in a SPREAD placement group, so on a cluster the ranges are solved on
different nodes.
Peak memory per actor: its rows of old + new features, 2 * rows * d * 4 bytes, plus the
batched solve (see ``unibct_ray.compat.prototypes``); no process holds the whole matrix.

With ``use_gpu`` the new-model features are extracted on GPU actors and each refinement actor
asks for a GPU share (``unibct_ray.resources``) and runs its batched solves there; the
placement group's bundles then carry that share, so the actors fit in them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from unibct_ray.compat.prototypes import balanced_class_ranges
from unibct_ray.data.shards import read_columns, read_manifest
from unibct_ray.distributed.data import FEATURE_COLUMN, OLD_FEATURE_COLUMN, feature_matrix
from unibct_ray.distributed.runtime import spread_placement

__all__ = ["RefineParams", "refine_distributed", "class_means_from_shards",
           "build_prototypes"]


@dataclass(frozen=True)
class RefineParams:
    lam: float = 0.9
    temperature: float = 0.05
    axis: str = "row"
    refine: bool = True


_RESTARTS = 1  # a killed refinement actor is restarted once and its call retried


@ray.remote(max_restarts=_RESTARTS, max_task_retries=2)
class RefineActor:
    """Holds nothing between calls; refines one class range per call.

    ``use_gpu``: the actor was given a GPU share; the solves run on ``cuda`` (float32, as on
    the CPU), the result comes back to the host.
    """

    def __init__(self, use_gpu: bool = False) -> None:
        import torch

        from unibct_ray.inference import select_device

        self.device = select_device(use_gpu)
        if self.device.type == "cpu":
            torch.set_num_threads(1)

    def node_id(self) -> str:
        """The Ray node this actor lives on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    def refine_arrays(self, old: np.ndarray, new: np.ndarray, labels: np.ndarray, c0: int, c1: int,
                      params: RefineParams) -> np.ndarray:
        from unibct_ray.compat.prototypes import refine_prototypes

        protos = refine_prototypes(old, new, labels - c0, c1 - c0, lam=params.lam, tau=params.temperature,
                                   axis=params.axis, refine=params.refine, device=self.device)
        return protos.numpy().astype(np.float32)

    def refine_shards(self, old_dir: str, new_dir: str, c0: int, c1: int, params: RefineParams) -> np.ndarray:
        from unibct_ray.distributed.extract import read_class_range

        oi, ol, old = read_class_range(old_dir, OLD_FEATURE_COLUMN, c0, c1)
        ni, _, new = read_class_range(new_dir, FEATURE_COLUMN, c0, c1)
        if not np.array_equal(oi, ni):
            raise RuntimeError(f"classes {c0}..{c1}: old and new feature rows differ "
                               f"({len(oi)} vs {len(ni)} rows)")
        return self.refine_arrays(old, new, ol, c0, c1, params)


def _spawn_actors(strategies: list, resources: dict[str, float] | None = None) -> list:
    """One refinement actor per placement bundle (``spread_placement``: spread over nodes).

    ``resources``: ``{"CPU": c[, "GPU": g]}`` of each actor (``refine_actor_resources``), the
    same as each bundle holds; None keeps the default CPU actor.
    """
    if not resources:
        return [RefineActor.options(scheduling_strategy=s).remote() for s in strategies]
    gpus = float(resources.get("GPU", 0.0))
    return [RefineActor.options(scheduling_strategy=s, num_cpus=resources["CPU"], num_gpus=gpus).remote(gpus > 0)
            for s in strategies]


def _gather(refs: list, ranges: list[tuple[int, int]], num_classes: int, d: int) -> np.ndarray:
    """Collect every class range -> [C, d], or raise: never a partly filled matrix.

    A killed actor is restarted by Ray and its call retried (the actors hold no state between
    calls, so a retry gives the same result); when the restarts are spent the class range is
    named in a ``JobFailedError``. An error raised by the refinement code itself is re-raised
    as it is (a ``DataFormatError`` stays a one-line user error).
    """
    from unibct_ray.distributed.runtime import unwrap_task_error
    from unibct_ray.errors import JobFailedError

    out = np.zeros((num_classes, d), np.float32)
    for (c0, c1), ref in zip(ranges, refs):
        try:
            out[c0:c1] = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise JobFailedError(f"prototype refinement of classes {c0}..{c1 - 1} failed: its Ray actor died "
                                 f"{1 + _RESTARTS} times; no prototypes were written ({first})") from e
        except ray.exceptions.RayTaskError as e:
            raise unwrap_task_error(e) from None
    return out


def refine_distributed(old: np.ndarray, new: np.ndarray, labels: np.ndarray, num_classes: int,
                       params: RefineParams, workers: int, placement: list[str] | None = None) -> np.ndarray:
    """In-memory arrays -> prototypes [C, d], class ranges spread over ``workers`` actors.

    ``placement``, when given, receives the Ray node id of each actor (logs, placement tests).
    """
    order = np.argsort(labels, kind="stable")
    old, new, labels = old[order], new[order], labels[order]
    counts = np.bincount(labels, minlength=num_classes)
    ranges = balanced_class_ranges(counts, workers, old.shape[1])
    starts = np.r_[0, np.cumsum(counts)]
    with spread_placement(min(workers, len(ranges))) as strategies:
        actors = _spawn_actors(strategies)
        if placement is not None:
            placement.extend(ray.get([a.node_id.remote() for a in actors]))
        refs = []
        for i, (c0, c1) in enumerate(ranges):
            a, b = starts[c0], starts[c1]
            refs.append(actors[i % len(actors)].refine_arrays.remote(old[a:b], new[a:b], labels[a:b], c0, c1, params))
        return _gather(refs, ranges, num_classes, old.shape[1])


def class_means_from_shards(path: str | os.PathLike, column: str, num_classes: int) -> np.ndarray:
    """Normalised per-class means of a feature column, streamed file by file -> [C, d]."""
    from unibct_ray.compat.prototypes import means_from_sums, partial_class_sums

    m = read_manifest(path)
    sums = counts = None
    for f in m.files:
        t = pq.read_table(f, columns=["label", column])
        s, c = partial_class_sums(feature_matrix(t, column), t.column("label").to_numpy(), num_classes)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    return means_from_sums(sums, counts, normalize=True).numpy().astype(np.float32)


def build_prototypes(cfg, run_dir: Path, train_dir: str, num_classes: int, checkpoint: Path | None,
                     *, epoch: int, refine: bool, weights: dict | None = None,
                     extract_cpus: float | None = None) -> Path:
    """Prototypes for the phase starting at ``epoch`` -> path of a ``.npy`` [C, d].

    bct: old classifier centres for classes the old model knows (matched by ``source_label``),
    normalised means of old features for the others. unibct: at a refinement epoch, refine
    with new-model features of the latest checkpoint; resuming inside a phase reuses the
    prototypes stored in the checkpoint.

    ``weights`` (``{"state_dict", "model_spec"}``): the live weights of a running training
    loop instead of a checkpoint file. Then nothing on disk is reused: the file is rebuilt
    from these weights (a restarted loop rebuilds it from the weights it restarted with).
    ``extract_cpus``: CPUs per extraction actor (None: the config's
    ``extract_cpus``). With ``cfg.use_gpu``
    the extraction actors and the refinement actors each ask for ``cfg.extract_gpus`` of a GPU
    (``unibct_ray.resources``) and compute there.
    """
    import torch

    from unibct_ray.checkpoint import load_checkpoint

    out = run_dir / f"prototypes-epoch{epoch:03d}.npy"
    if out.exists() and weights is None:
        return out
    method = cfg.compat.method
    if method == "bct":
        from unibct_ray.compat.losses import bct_prototypes

        old_state = load_checkpoint(cfg.compat.old_checkpoint)
        means = class_means_from_shards(train_dir, OLD_FEATURE_COLUMN, num_classes)
        class_map = _old_class_map(cfg.compat.old_checkpoint, old_state, train_dir, num_classes)
        centres = old_state["head"]["weight"].float().numpy()
        protos = bct_prototypes(torch.from_numpy(centres), class_map, torch.from_numpy(means)).numpy()
    elif not refine and checkpoint is not None and (stored := load_checkpoint(checkpoint).get("prototypes")) is not None:
        protos = stored.float().numpy()  # resuming inside a phase: the refinement already ran
    elif not cfg.compat.refine:
        protos = class_means_from_shards(train_dir, OLD_FEATURE_COLUMN, num_classes)
    else:
        from unibct_ray.distributed.extract import extract_features

        if checkpoint is None and weights is None:
            raise RuntimeError("refinement needs a checkpoint of the new model")
        from unibct_ray.resources import extract_actor_resources

        new_dir = run_dir / f"new_features-epoch{epoch:03d}"
        if weights is not None or not (new_dir / "manifest.json").exists():
            res = extract_actor_resources(cfg, cpus=extract_cpus)
            n_act = cfg.extract_actors
            where = f"{res['GPU']:g} GPU each" if "GPU" in res else f"{res['CPU']:g} CPU each"
            print(f"[{cfg.name}] epoch {epoch}: extracting new-model features ({n_act} actors, {where})", flush=True)
            extract_features(train_dir, new_dir, checkpoint=checkpoint, column=FEATURE_COLUMN,
                             actors=n_act, batch_size=cfg.extract_batch, cpus_per_actor=res["CPU"],
                             gpus_per_actor=res.get("GPU", 0.0),
                             overwrite=True, sort_by_label=True, **(weights or {}))
        labels = read_columns(read_manifest(train_dir), ["label"])["label"]
        counts = np.bincount(labels, minlength=num_classes)
        ranges = balanced_class_ranges(counts, max(1, cfg.refine_actors), cfg.model.embedding_size)
        params = RefineParams(cfg.compat.lam, cfg.compat.temperature, cfg.compat.axis, True)
        from unibct_ray.resources import refine_actor_resources

        ref_res = refine_actor_resources(cfg)
        # CPU-only runs keep the default CPU actors (and their 1-CPU bundles) exactly as before.
        ref_res = ref_res if "GPU" in ref_res else None
        with spread_placement(min(cfg.refine_actors, len(ranges)), resources=ref_res) as strategies:
            actors = _spawn_actors(strategies, ref_res)
            print(f"[{cfg.name}] epoch {epoch}: refining {num_classes} prototypes on {len(actors)} actors", flush=True)
            refs = [actors[i % len(actors)].refine_shards.remote(str(train_dir), str(new_dir), c0, c1, params)
                    for i, (c0, c1) in enumerate(ranges)]
            protos = _gather(refs, ranges, num_classes, cfg.model.embedding_size)
    tmp = out.with_name(f".{out.name}.tmp.npy")
    np.save(tmp, np.asarray(protos, np.float32))
    os.replace(tmp, out)
    return out


def _old_class_map(old_ckpt: str, old_state: dict, train_dir: str, num_classes: int) -> np.ndarray:
    """[C_new] old-model class index of each new class, or -1 when the old model never saw it.

    Matches through ``source_label`` (the class in the set both splits came from). Without it
    the label spaces cannot be related and every class gets a synthesized centre.
    """
    import json

    from unibct_ray.config import from_dict

    new_m = read_manifest(train_dir)
    class_map = np.full(num_classes, -1, np.int64)
    old_cfg = from_dict(json.loads(old_state["config"]), old_ckpt)
    if "source_label" not in new_m.columns:
        return class_map
    try:
        old_m = read_manifest(old_cfg.data.train)
    except Exception:
        return class_map
    if "source_label" not in old_m.columns:
        return class_map
    old_cols = read_columns(old_m, ["label", "source_label"])
    new_cols = read_columns(new_m, ["label", "source_label"])
    src_to_old = dict(zip(old_cols["source_label"].tolist(), old_cols["label"].tolist()))
    for lab, src in zip(*np.unique(np.stack([new_cols["label"], new_cols["source_label"]], 1), axis=0).T):
        class_map[int(lab)] = src_to_old.get(int(src), -1)
    return class_map
