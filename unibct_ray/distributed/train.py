"""Training on Ray Train: one loop for the old model and every compatible method.

The driver (``train``) splits a run into *phases* at the UniBCT refinement epochs. Each phase
is one ``TorchTrainer.fit()`` that resumes from the previous checkpoint; between phases the
driver extracts new-model features on an actor pool, refines the class prototypes on
refinement actors (class ranges) and hands the result to every worker of the next phase. With
no refinement (old model, independent, l2, bct, nccl, advbct, mixbct) the run is a single phase.

The margin head is model-parallel whenever there are several workers (``head.parallel``):
each rank holds a contiguous 1/world of the class centres, the embeddings and labels are
all-gathered each step and the softmax is computed across ranks
(``unibct_ray.models.heads.ParallelMarginHead``); only the backbone is wrapped in DDP, so the
centres (93,431 x 512 for MS1Mv3) are never all-reduced. Checkpoints hold the full head
(gathered on save, sliced on load): a run resumes on any world size and in either mode.

Inside the loop only ``get_dataset_shard``, ``report``, ``prepare_model`` and the checkpoint
API touch Ray; the math lives in ``unibct_ray.models`` and ``unibct_ray.compat``.

GPUs: with ``use_gpu`` each worker asks for ``1 - extract_gpus`` of a GPU
(``unibct_ray.resources.train_worker_resources``). Ray 2.60's ``ScalingConfig`` accepts a
fractional ``"GPU"`` in ``resources_per_worker`` with ``use_gpu=True`` (it only refuses 0), and
Ray never splits one fractional request over two devices: a worker's share (> 0.5) lies on a
single GPU that no second worker can join, so ``ray.get_gpu_ids()`` names one device per
worker and ``ray.train.torch.get_device()`` returns it, as with whole GPUs. What is left on
each worker's GPU (``extract_gpus``) takes one extraction or refinement actor.

An in-loop refinement (a run whose prototypes are rebuilt from the live weights) therefore
embeds the training set on an actor pool with a fractional GPU share beside the held workers,
rather than having each Train rank embed its own shard: it is the same code path as every
other inference pass (old features, evaluation), the workers keep their state (optimizer,
data iterators, DDP process group) untouched while rank 0 drives the pass, and the pool
overlaps JPEG decode on the actors' CPUs with the forward passes on the GPU share. The cost
is that the other ranks' GPUs carry only one small actor each during the pass.

Why one file of ~900 lines: the driver (phases, groups, the plan check, old features) and the
worker loop share one run contract (the ``run`` dict, checkpoint payloads, metrics rows); kept
together, a change to that contract is made in one place. The math lives elsewhere.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray
import torch

from unibct_ray.checkpoint import (
    CHECKPOINT_FILE,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from unibct_ray.config import TrainConfig, from_dict, to_dict
from unibct_ray.data.shards import atomic_write_text, read_manifest
from unibct_ray.distributed.data import FLIP_COLUMN, OLD_FEATURE_COLUMN, epoch_clock, set_epoch_clock, training_dataset
from unibct_ray.distributed.method_inputs import write_method_inputs
from unibct_ray.distributed.runtime import keep_sigint_handler
from unibct_ray.errors import ConfigError, JobFailedError, UserError
from unibct_ray.resources import extract_actor_resources, train_worker_resources

__all__ = ["train", "train_group", "check_inputs", "old_features_dir", "OLD_FEATURES_DIR", "train_loop_per_worker",
           "plan_phases", "poly_lr", "TrainResult", "ddp_buffer_kwargs", "MetricsTail", "epoch_line"]


OLD_FEATURES_DIR = "old_features"  # under STORAGE, unless compat.old_features_cache names the root


def poly_lr(base_lr: float, step: int, total_steps: int, power: float, warmup_steps: int = 0) -> float:
    """Linear warm-up, then ``base_lr * (1 - t / T) ** power`` (insightface's polynomial decay)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(max(step - warmup_steps, 0), max(total_steps - warmup_steps, 1))
    return base_lr * (1.0 - t / max(total_steps - warmup_steps, 1)) ** power


def plan_phases(start_epoch: int, epochs: int, refine_epochs: tuple[int, ...], method: str) -> list[tuple[int, int, bool]]:
    """[(first epoch, end epoch, refine before it)] covering ``start_epoch..epochs``."""
    cuts = sorted(e for e in set(refine_epochs) if method == "unibct" and 0 < e < epochs)
    edges = [0, *cuts, epochs]
    phases = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= start_epoch:
            continue
        phases.append((max(a, start_epoch), b, a in cuts))
    return phases


class _TrainModule(torch.nn.Module):
    """Backbone + a full margin classifier as one module, so DDP syncs both (the replicated
    head, ``head.parallel: false``; also the one-process reference)."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor,
                mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(emb [b, d], logits [b, C])``; ``mix`` changes the head's input only (MixBCT)."""
        emb = self.backbone(x)
        return emb, self.head(emb if mix is None else mix(emb), labels)


def _build(cfg: TrainConfig, num_classes: int) -> _TrainModule:
    """Backbone + the full (replicated) head. The centres are drawn per class block from
    ``cfg.seed`` (:func:`unibct_ray.models.heads.init_centres`): the parallel head starts from
    the same centres on any number of workers."""
    from unibct_ray.models.heads import NormalizedClassifier, margin_function
    from unibct_ray.models.iresnet import build_backbone

    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.data.image_size, cfg.model.dropout)
    head = NormalizedClassifier(num_classes, cfg.model.embedding_size,
                                margin_function(cfg.head.type, cfg.head.scale, cfg.head.margin), init_seed=cfg.seed)
    return _TrainModule(backbone, head)


def _unwrap(module: torch.nn.Module) -> _TrainModule:
    return module.module if hasattr(module, "module") else module


@dataclass
class _Parts:
    """What one worker trains: ``model`` is what ``train_step`` calls (DDP over the backbone
    alone with the parallel head, over backbone + head without it)."""

    model: torch.nn.Module
    backbone: torch.nn.Module
    head: torch.nn.Module          # ParallelMarginHead (a slice of the centres) or NormalizedClassifier
    parallel: bool

    def trainable(self) -> list[torch.nn.Parameter]:
        """Optimizer parameters: the backbone's, then the centres (one order in both modes, so
        a checkpoint's optimizer state fits either)."""
        return [p for p in self.backbone.parameters() if p.requires_grad] + [self.head.weight]

    def head_index(self) -> int:
        return len(self.trainable()) - 1


def _build_parts(cfg: TrainConfig, num_classes: int, rank: int, world: int, device: torch.device,
                 state: dict | None, prepare: Callable[..., torch.nn.Module]) -> _Parts:
    """Build (and restore) a worker's model; ``prepare`` wraps a module for DDP
    (``ray.train.torch.prepare_model``). A checkpoint always holds the full head; the parallel
    head takes its own rows of it, whatever world size wrote it."""
    from unibct_ray.models.heads import ParallelMarginHead, margin_function

    ddp = ddp_buffer_kwargs()  # BN buffers stay per rank; one broadcast less per step
    if not cfg.head_parallel:
        module = _build(cfg, num_classes)
        if state is not None:
            module.backbone.load_state_dict(state["model"])
            module.head.load_state_dict(state["head"])
        if cfg.channels_last and device.type == "cuda":
            module.backbone.to(memory_format=torch.channels_last)
        model = prepare(module, parallel_strategy_kwargs=ddp)
        inner = _unwrap(model)
        return _Parts(model, inner.backbone, inner.head, False)
    full = _build(cfg, 0)  # the backbone, drawn from the seed exactly as in the replicated mode
    backbone = full.backbone
    head = ParallelMarginHead(num_classes, cfg.model.embedding_size,
                              margin_function(cfg.head.type, cfg.head.scale, cfg.head.margin), rank, world,
                              sample_rate=cfg.head.sample_rate, seed=cfg.seed,
                              # DDP averages the backbone's gradients; the loss is already the global mean
                              grad_scale=float(world))
    if state is not None:
        backbone.load_state_dict(state["model"])
        with torch.no_grad():
            head.weight.copy_(_checked_head(state, num_classes)[head.class_start:head.class_end])
    if cfg.channels_last and device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    model = prepare(backbone, parallel_strategy_kwargs=ddp)  # the centres stay out of DDP's buckets
    head.to(device)
    return _Parts(model, _unwrap(model), head, True)


def ddp_buffer_kwargs() -> dict[str, bool]:
    """DDP keyword that stops the per-forward broadcast of rank 0's buffers (BatchNorm running
    statistics): ``forward_sync_buffers=False`` where this torch has it (it still syncs them
    once at construction), ``broadcast_buffers=False`` on older versions."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _checked_head(state: dict, num_classes: int) -> torch.Tensor:
    w = state["head"]["weight"]
    if w.shape[0] != num_classes:
        raise UserError(f"checkpoint head has {w.shape[0]} classes, the training set {num_classes}")
    return w


def _gather_rows(part: torch.Tensor, num_classes: int, world: int) -> torch.Tensor:
    """Every rank's slice ``[C_r, ...]`` -> the full ``[C, ...]`` on every rank (CPU)."""
    from unibct_ray.models.heads import class_range

    ranges = [class_range(num_classes, r, world) for r in range(world)]
    rows = max(e - s for s, e in ranges)
    pad = part.new_zeros((rows, *part.shape[1:]))
    pad[:part.shape[0]] = part.detach()
    parts = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(parts, pad)  # equal shapes: the first ranks hold one class more
    return torch.cat([p[:e - s] for p, (s, e) in zip(parts, ranges)]).cpu()


def _full_state(parts: _Parts, optimizer: torch.optim.Optimizer, num_classes: int,
                world: int) -> tuple[dict, dict]:
    """(head state_dict, optimizer state_dict) with the FULL centres and their momentum.

    A collective with the parallel head: every rank calls it, rank 0 saves the result."""
    opt = optimizer.state_dict()
    if not parts.parallel:
        return parts.head.state_dict(), opt
    head = {"weight": _gather_rows(parts.head.weight, num_classes, world)}
    i = parts.head_index()
    entry = opt["state"].get(i)
    # every rank has stepped equally often, so all hold a momentum buffer or none does
    if entry is not None and entry.get("momentum_buffer") is not None:
        opt = {**opt, "state": {**opt["state"], i: {**entry, "momentum_buffer":
                                                    _gather_rows(entry["momentum_buffer"], num_classes, world)}}}
    return head, opt


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict, parts: _Parts) -> None:
    """Restore a checkpoint's optimizer state; the parallel head takes its rows of the full
    momentum of the centres."""
    if parts.parallel:
        i = parts.head_index()
        entry = saved["state"].get(i)
        if entry is not None and entry.get("momentum_buffer") is not None:
            mom = entry["momentum_buffer"][parts.head.class_start:parts.head.class_end].clone()
            saved = {**saved, "state": {**saved["state"], i: {**entry, "momentum_buffer": mom}}}
    optimizer.load_state_dict(saved)


@dataclass
class _Method:
    """A worker's compatibility method: the loss and what it keeps across steps.

    ``aux``: trained parts saved in the checkpoint (advbct's discriminator and radii), in the
    optimizer as a second parameter group; ``credible``: sorted record indices of the credible
    samples (mixbct). nccl's queue lives in ``compat.term`` and is not checkpointed: after a
    restart it refills from the next step on (it always holds the current batch)."""

    compat: Any
    aux: torch.nn.Module | None = None
    credible: torch.Tensor | None = None
    ratio: float = 0.0
    seed: int = 0
    rank: int = 0

    def mix_for(self, batch: dict, step: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """mixbct: the head-input mix of this batch, positions drawn from a generator seeded by
        (seed, step, rank); None for every other method."""
        if self.credible is None:
            return None
        from unibct_ray.compat.mixbct import is_credible, mix_embeddings, mix_positions

        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 10_007 + self.rank) % (2**63 - 1))
        positions = mix_positions(is_credible(batch["index"], self.credible), self.ratio, g)
        return functools.partial(mix_embeddings, old=batch[OLD_FEATURE_COLUMN], positions=positions)


def _build_method(cfg: TrainConfig, run: dict, parts: _Parts, rank: int, world: int, device: torch.device,
                  state: dict | None, prepare: Callable[..., torch.nn.Module]) -> _Method:
    """The compatibility method of ``cfg`` for one worker (restoring its trained parts from
    ``state``). ``run['method_inputs']``: the driver's once-per-run file for advbct / mixbct
    (:mod:`unibct_ray.distributed.method_inputs`)."""
    from unibct_ray.compat.losses import CompatLoss

    c = cfg.compat
    term, aux, credible = None, None, None
    if c.method == "nccl":
        from unibct_ray.compat.nccl import NCCLLoss
        from unibct_ray.models.heads import all_gather_rows

        if parts.parallel:
            raise ConfigError("compat.method nccl needs the replicated head (head.parallel false)")
        # the replicated head: every rank holds the same centres, so each computes the old
        # logits of the gathered rows itself
        term = NCCLLoss(parts.head, c.nccl_queue, c.nccl_alpha, c.nccl_beta, c.nccl_temperature,
                        gather=all_gather_rows if world > 1 else None)
    elif c.method == "advbct":
        from unibct_ray.compat.advbct import AdvBCTLoss, AdvBCTModule
        from unibct_ray.models.heads import Reducer

        with np.load(run["method_inputs"], allow_pickle=False) as z:
            # the point-to-set mean is over the global batch's violating rows: their count is summed
            aux = AdvBCTModule(torch.from_numpy(z["centres"]), torch.from_numpy(z["r_max"]),
                               torch.from_numpy(z["counts"]), hidden=c.advbct_hidden,
                               threshold=c.advbct_threshold, seed=cfg.seed,
                               count_sum=Reducer.for_group().sum_ if world > 1 else None, world=world)
        if state is not None and state.get("compat_state") is not None:
            aux.load_state_dict(state["compat_state"])
        wrapped = prepare(aux, parallel_strategy_kwargs=ddp_buffer_kwargs())  # gradients averaged like the backbone's
        aux = _unwrap(wrapped)
        term = AdvBCTLoss(wrapped, c.advbct_p2s_weight, c.advbct_adv_weight)
    elif c.method == "mixbct":
        with np.load(run["method_inputs"], allow_pickle=False) as z:
            credible = torch.from_numpy(z["credible_index"].astype(np.int64))
    compat = CompatLoss.from_section(c, term=term)
    return _Method(compat, aux, credible, c.mixbct_ratio, cfg.seed, rank)


def _make_optimizer(cfg: TrainConfig, parts: _Parts, method: _Method) -> torch.optim.Optimizer:
    """SGD over the backbone and the centres, plus the method's trained parts (advbct) as a
    second parameter group: the first group keeps the centres last (``_Parts.head_index``)."""
    optimizer = torch.optim.SGD(
        parts.trainable(), lr=cfg.effective_lr,
        momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
    )
    if method.aux is not None:
        optimizer.add_param_group({"params": list(method.aux.parameters())})
    return optimizer


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train worker: the runs in ``loop['runs']``, one after the other, over one dataset.

    Each run entry holds its config, epochs ``first_epoch .. end_epoch`` and where its weights
    start. A run with ``in_loop`` set builds its prototypes inside the loop (rank 0 extracts
    features with the live weights on an actor pool and refines on refinement actors, the
    other ranks wait) and writes its ``final.pt``; otherwise the driver has built them
    (``prototypes``) and copies the final checkpoint itself. After a failure Ray restarts the
    group from the last reported checkpoint, which names its run (``group_index``).
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    runs = loop["runs"]
    start, restored = 0, None
    ckpt = ray.train.get_checkpoint()  # set when Ray restarts the group after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        start = int(restored.get("group_index", 0))
    shard = ray.train.get_dataset_shard("train")
    for i in range(start, len(runs)):
        run = runs[i]
        state = restored if i == start and restored is not None else (
            load_checkpoint(run["resume_from"]) if run.get("resume_from") else None)
        _train_run(run, i, state, shard, rank, world, device)


def _needs_prototypes(cfg: TrainConfig, epoch: int) -> bool:
    method = cfg.compat.method
    return method == "bct" or (method == "unibct" and epoch >= min(cfg.compat.refine_epochs, default=10**9))


def _live_prototypes(cfg: TrainConfig, run: dict, backbone: torch.nn.Module, epoch: int, refine: bool,
                     rank: int, world: int, device: torch.device) -> torch.Tensor:
    """Prototypes for ``epoch`` built inside the loop: rank 0 builds, every rank loads."""
    from dataclasses import replace

    from unibct_ray.distributed.prototypes import build_prototypes

    path = Path(run["run_dir"]) / f"prototypes-epoch{epoch:03d}.npy"
    if rank == 0:
        # A worker's working directory is not the driver's: the old checkpoint by absolute path.
        cfg = replace(cfg, compat=replace(cfg.compat, old_checkpoint=run["old_checkpoint"]))
        weights = {"state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
                   "model_spec": {"name": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                                  "input_size": cfg.data.image_size, "dropout": cfg.model.dropout}}
        # The training workers keep their CPUs while rank 0 waits here. The extraction actors
        # share what is left but one CPU, kept for the training data's decode tasks still in
        # flight (on one 4-CPU node: 2 actors x 0.5 CPU + 1 CPU).
        from unibct_ray.plan import in_loop_extract_cpus

        total = ray.cluster_resources()
        cpus = in_loop_extract_cpus(cfg, total.get("CPU", 0.0))  # the plan checked this very request
        if cfg.use_gpu:
            # Each worker leaves extract_gpus of its GPU; an actor pool or placement group asking
            # for more GPU shares than are left would wait for actors that never start.
            left = total.get("GPU", 0.0) - cfg.num_workers * (1.0 - cfg.extract_gpus)
            slots = max(1, int(left / cfg.extract_gpus + 1e-6))
            cfg = replace(cfg, extract_actors=min(cfg.extract_actors, slots),
                          refine_actors=min(cfg.refine_actors, slots))
        path = build_prototypes(cfg, Path(run["run_dir"]), run["train_dir"], run["num_classes"], None,
                                epoch=epoch, refine=refine, weights=weights, extract_cpus=cpus)
    if world > 1:
        torch.distributed.barrier()  # rank 0 wrote the file (shared storage, like metrics.csv)
    return torch.from_numpy(np.load(path, allow_pickle=False)).float().to(device)


def _train_run(run: dict[str, Any], index: int, state: dict | None, shard: Any, rank: int, world: int,
               device: torch.device) -> None:
    """Epochs ``run['first_epoch'] .. run['end_epoch']`` of one run (see ``train_loop_per_worker``)."""
    import ray.train

    from unibct_ray.training import NonFiniteGuard, device_images, train_step

    cfg = from_dict(run["config"])
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts anyway)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest conv kernels once
    parts = _build_parts(cfg, run["num_classes"], rank, world, device, state, ray.train.torch.prepare_model)
    model = parts.model
    params_backbone = list(parts.backbone.parameters())
    method = _build_method(cfg, run, parts, rank, world, device, state, ray.train.torch.prepare_model)
    compat = method.compat
    optimizer = _make_optimizer(cfg, parts, method)
    first_epoch, end_epoch = run["first_epoch"], run["end_epoch"]
    step = 0
    metrics: dict[str, Any] = {}
    if state is not None:
        _load_optimizer(optimizer, state["optimizer"], parts)
        first_epoch = max(first_epoch, int(state["epoch"]))
        step = int(state["step"])
        metrics = json.loads(state["metrics"])

    in_loop = bool(run.get("in_loop"))
    cuts = {e for e, _, refine in plan_phases(0, cfg.optim.epochs, cfg.compat.refine_epochs, cfg.compat.method) if refine}
    prototypes = None
    if run.get("prototypes"):
        prototypes = torch.from_numpy(np.load(run["prototypes"], allow_pickle=False)).float().to(device)
    elif in_loop and _needs_prototypes(cfg, first_epoch) and first_epoch not in cuts:
        stored = state.get("prototypes") if state is not None else None
        if stored is not None:
            prototypes = stored.float().to(device)  # resumed after a refinement: keep its result
        elif first_epoch < end_epoch:
            prototypes = _live_prototypes(cfg, run, parts.backbone, first_epoch, False, rank, world, device)
    steps_per_epoch = run["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    use_amp = cfg.use_gpu and cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    # bf16 has float32's exponent range: no loss scaling
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    guard = NonFiniteGuard(cfg.optim.nonfinite_steps, cfg.name)

    def agree(ok: bool) -> bool:
        """Every rank skips a step together when any rank's loss is NaN/inf (DDP needs the same
        collectives on every rank)."""
        if world == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    for epoch in range(first_epoch, end_epoch):
        if in_loop and epoch in cuts:
            if rank == 0:
                print(f"[{cfg.name}] epoch {epoch}: new prototypes from the live weights", flush=True)
            prototypes = _live_prototypes(cfg, run, parts.backbone, epoch, True, rank, world, device)
        model.train()
        w = compat.weight_at(epoch, cfg.compat.refine_epochs)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, head, compat, images, applied steps
        t0 = time.perf_counter()
        n_steps = 0
        # Seeded per (seed, epoch, rank): every epoch a new order.
        shuffle = {"local_shuffle_buffer_size": cfg.data.shuffle_buffer,
                   "local_shuffle_seed": (cfg.seed * 100_003 + epoch) * 1_009 + rank} if cfg.data.shuffle_buffer > 0 else {}
        if rank == 0 and run.get("epoch_clock"):
            # Before this rank asks for the epoch's data, which Ray Data starts only when every
            # rank has asked: every decode task of the epoch reads this epoch for its flips.
            set_epoch_clock(run["epoch_clock"], epoch)
        # pinned host batches: the copy to the GPU runs asynchronously (Ray Data's own pinning)
        pin = {"pin_memory": True} if device.type == "cuda" else {}
        for batch in shard.iter_torch_batches(batch_size=cfg.per_worker_batch, drop_last=True, device=device,
                                              **pin, **shuffle):
            if n_steps >= steps_per_epoch:
                break  # equal step counts on every rank, or DDP would wait forever
            lr = poly_lr(cfg.effective_lr, step, total_steps, cfg.optim.poly_power, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            y = batch["label"]
            x = device_images(batch["image"], batch.get(FLIP_COLUMN),
                              channels_last=cfg.channels_last and device.type == "cuda")
            compat.schedule(step, total_steps, epoch, cfg.optim.epochs)
            r = train_step(model, optimizer, x, y, compat=compat, weight=w, mix=method.mix_for(batch, step),
                           old_features=batch.get(OLD_FEATURE_COLUMN), prototypes=prototypes,
                           clip_params=params_backbone, clip_norm=cfg.optim.clip_grad_norm,
                           scaler=scaler, autocast_device="cuda" if use_amp else None,
                           agree=agree, amp_dtype=amp_dtype,
                           head=functools.partial(parts.head, step=step) if parts.parallel else None)
            guard.update(r, step, epoch)  # raises after optim.nonfinite_steps NaN/inf steps in a row
            step += 1
            n_steps += 1
            if r.applied:  # a skipped step's NaN must not poison the epoch's means
                sums += torch.tensor([r.loss, r.head_loss, r.compat_loss, len(y), 1], dtype=torch.float64)
            else:
                sums[3] += len(y)
        elapsed = time.perf_counter() - t0
        if world > 1:
            torch.distributed.all_reduce(sums)
        metrics = {
            "epoch": epoch + 1,
            "loss": float(sums[0] / max(float(sums[4]), 1.0)),
            "head_loss": float(sums[1] / max(float(sums[4]), 1.0)),
            "compat_loss": float(sums[2] / max(float(sums[4]), 1.0)),
            "compat_weight": float(w),
            "lr": float(lr) if n_steps else float("nan"),
            "images_per_s": float(sums[3] / max(elapsed, 1e-9)),
            "steps": n_steps,
            "epoch_s": elapsed,
        }
        full = _full_state(parts, optimizer, run["num_classes"], world)  # a collective: every rank
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(Path(d) / CHECKPOINT_FILE,
                                _payload(run, index, parts, full, epoch + 1, step, prototypes, metrics, method.aux))
                atomic_write_text(Path(d) / "meta.json", json.dumps({"epoch": epoch + 1, **metrics}) + "\n")
                _append_metrics(Path(run["run_dir"]) / "metrics.csv", metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    if in_loop:
        full = _full_state(parts, optimizer, run["num_classes"], world)
        if rank == 0:
            # The run's result, written where the driver (and any later resume) looks for it.
            save_checkpoint(Path(run["run_dir"]) / "final.pt",
                            _payload(run, index, parts, full, end_epoch, step, prototypes, metrics, method.aux))


def _payload(run: dict, index: int, parts: _Parts, full: tuple[dict, dict], epoch: int,
             step: int, prototypes: torch.Tensor | None, metrics: dict,
             aux: torch.nn.Module | None = None) -> dict[str, Any]:
    """A checkpoint: the backbone, the FULL head and optimizer state (``full``, from
    :func:`_full_state`), so any world size and either head mode can resume it, and the
    method's trained parts (``compat_state``: advbct's discriminator and radii)."""
    head, opt = full
    return {
        "config": json.dumps(run["config"]),
        "epoch": epoch,
        "step": step,
        "num_classes": run["num_classes"],
        "model": parts.backbone.state_dict(),
        "head": head,
        "optimizer": opt,
        "prototypes": prototypes.cpu() if prototypes is not None else None,
        "compat_state": {k: v.detach().cpu() for k, v in aux.state_dict().items()} if aux is not None else None,
        "metrics": json.dumps(metrics),
        "group_index": index,
    }


def _append_metrics(path: Path, metrics: dict) -> None:
    """Add the row of ``metrics['epoch']``, dropping rows of that epoch and later ones: an epoch
    re-run after a restart or a resume replaces what the failed attempt wrote, so the file
    holds one row per epoch (rewritten atomically)."""
    import io

    from unibct_ray.atomic import atomic_write

    rows: list[dict] = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(float(r["epoch"])) < int(metrics["epoch"])]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(metrics), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    w.writerow(metrics)
    atomic_write(path, buf.getvalue())


def _atomic_copy(src: Path, dst: Path) -> None:
    from unibct_ray.atomic import atomic_write

    def chunks():
        with open(src, "rb") as f:
            while block := f.read(1 << 22):
                yield block

    atomic_write(dst, chunks())


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict


def _old_features_key(old_checkpoint: str, train_dir: str) -> str:
    """``<checkpoint sha256[:16]>-<manifest sha256[:12]>``: same model and same shard set."""
    import hashlib

    h = hashlib.sha256()
    with open(old_checkpoint, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    m = hashlib.sha256((Path(train_dir) / "manifest.json").read_bytes()).hexdigest()
    return f"{h.hexdigest()[:16]}-{m[:12]}"


def _num_classes(shards: str) -> int:
    m = read_manifest(shards)
    return int(max(m.classes, int(m.extra.get("label_max", m.classes - 1)) + 1))


class MetricsTail:
    """The rows a run's ``metrics.csv`` gained since the last look.

    Rows are keyed by content: a re-run epoch replaces its row (see ``_append_metrics``) and
    then counts as new. Rows already there when the tail is made are not new.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.seen = {self._key(r) for r in self._rows()}

    @staticmethod
    def _key(row: dict) -> tuple:
        return tuple(sorted(row.items()))

    def _rows(self) -> list[dict]:
        try:
            with open(self.path, newline="") as f:
                return list(csv.DictReader(f))
        except OSError:
            return []

    def new_rows(self) -> list[dict]:
        out = []
        for r in self._rows():
            if self._key(r) not in self.seen:
                self.seen.add(self._key(r))
                out.append(r)
        return out


def epoch_line(row: dict, epochs: int) -> str:
    """A ``metrics.csv`` row as the progress line of its epoch."""
    return (f"epoch {row['epoch']}/{epochs}  loss {float(row['loss']):.4f} "
            f"(head {float(row['head_loss']):.4f}, compat {float(row['compat_loss']):.4f} "
            f"x{float(row['compat_weight']):g})  lr {float(row['lr']):.4g}  "
            f"{float(row['images_per_s']):.0f} img/s  {float(row['epoch_s']):.1f} s")


class _ProgressTail:
    """Print each new row of ``metrics.csv`` as a progress line while ``fit()`` runs.

    Workers' stdout does not reach a quiet driver; the CSV (written by rank 0 on shared
    storage) does, whatever node rank 0 is on.
    """

    def __init__(self, path: Path, name: str, epochs: int):
        import threading

        self.tail, self.name, self.epochs = MetricsTail(path), name, epochs
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            self.flush()

    def flush(self) -> None:
        for r in self.tail.new_rows():
            print(f"[{self.name}] {epoch_line(r, self.epochs)}", flush=True)

    def __enter__(self) -> "_ProgressTail":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.flush()


def _ingest_config(reproducible: bool) -> "ray.train.DataConfig":
    """Rows in order: a slow decode task can't reorder the seeded block order.

    Which blocks reach which worker is Ray Data's split. With shard locality on, the splitter
    holds blocks back and hands each worker one whose object-store location matches its node;
    locations are looked up as blocks arrive, so on a cluster the assignment depends on where
    and when blocks land. A ``reproducible`` run (no shuffle buffer) turns locality off: blocks
    then go, in order, to the worker with the fewest rows so far - the same every run."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    # Built here rather than by DataConfig.default_ingest_options(), which copies the context's
    # exclude_resources through a setter Ray 2.60 deprecates (a RayDeprecationWarning on every
    # run); the ingest keeps the context's resource limits and needs nothing excluded.
    ctx = DataContext.get_current().execution_options
    opts = ExecutionOptions(resource_limits=ctx.resource_limits, preserve_order=True,
                            verbose_progress=ctx.verbose_progress)
    return ray.train.DataConfig(execution_options={"train": opts}, enable_shard_locality=not reproducible)


def _worker_error_line(e: BaseException) -> str:
    """One line for a failed ``fit()``: a worker's own error (e.g. a diverged loss) when there
    is one, else the first line of Ray's message."""
    from unibct_ray.distributed.runtime import unwrap_task_error

    ours = ("NonFiniteLoss", "UserError", "DataFormatError", "ConfigError")
    lines = []
    for rank in sorted(getattr(e, "worker_failures", None) or {}):
        err = unwrap_task_error(e.worker_failures[rank])
        text = str(err).strip()
        if type(err).__name__ in ours and text:
            lines.append(text.splitlines()[0][:300])
            continue
        for marker in (f"{name}: " for name in ours):  # a remote traceback's last line
            if marker in text:
                lines.append(text.split(marker, 1)[1].strip().splitlines()[0][:300])
                break
    # the rank that saw the NaN names the loss term; the others only know a peer did
    lines.sort(key=lambda line: "another worker" in line)
    return lines[0] if lines else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _start_line(cfg: TrainConfig, runs: list[dict]) -> str:
    """What a ``fit()`` is preparing, printed before it: starting the workers and the input
    pipeline takes ~20 s before the first step, and the first epoch line comes after that."""
    r = runs[0]
    if len(runs) == 1:
        a, b = r["first_epoch"] + 1, r["end_epoch"]
        who, what = r["config"]["name"], (f"epoch {a}" if a == b else f"epochs {a}-{b}") + f" of {cfg.optim.epochs}"
    else:
        who, what = "group", f"{len(runs)} runs"
    workers = f"{cfg.num_workers} Ray Train worker{'s' if cfg.num_workers != 1 else ''} ({'GPU' if cfg.use_gpu else 'CPU'})"
    return (f"[{who}] {what}: starting {workers} and the Ray Data input pipeline ({r['steps_per_epoch']} steps "
            f"of {cfg.global_batch} images per epoch); a line follows each epoch")


def _fit(cfg: TrainConfig, loop: dict, dataset: ray.data.Dataset, run_dir: Path, phase: str,
         tails: list[tuple[Path, str, int]]) -> Path:
    """One ``TorchTrainer.fit()`` of ``loop`` (storage ``run_dir/phase``) -> its last checkpoint.

    ``tails``: (metrics.csv, run name, epochs) of each run, printed as progress lines."""
    import contextlib

    import ray.train
    from ray.train.torch import TorchTrainer

    print(_start_line(cfg, loop["runs"]), flush=True)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker=train_worker_resources(cfg),  # GPU 1 - extract_gpus: see the module docstring
        ),
        run_config=ray.train.RunConfig(
            name=phase,
            storage_path=str(run_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=_ingest_config(cfg.data.shuffle_buffer == 0),
    )
    try:
        with contextlib.ExitStack() as stack:
            for path, name, epochs in tails:
                stack.enter_context(_ProgressTail(path, name, epochs))
            stack.enter_context(keep_sigint_handler())
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        first = _worker_error_line(e)
        raise JobFailedError(f"training phase {phase} of {run_dir} failed after {cfg.max_failures} restarts "
                             f"from the last checkpoint ({first})") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training phase {phase} finished without a checkpoint")
    return Path(result.checkpoint.path) / CHECKPOINT_FILE


def _check_old_checkpoint(cfg: TrainConfig) -> None:
    """``compat.old_checkpoint`` loads safely, fits its architecture and shares the new model's
    embedding size (the compatibility losses compare old and new embeddings in one space)."""
    from unibct_ray.checkpoint import build_backbone_from_checkpoint

    path = Path(cfg.compat.old_checkpoint)
    _, old_cfg, _ = build_backbone_from_checkpoint(path)
    if old_cfg.model.embedding_size != cfg.model.embedding_size:
        raise ConfigError(f"{path}: embedding size {old_cfg.model.embedding_size} differs from model.embedding_size "
                          f"{cfg.model.embedding_size}; compat.method {cfg.compat.method!r} needs one embedding space")


@dataclass(frozen=True)
class _RunPlan:
    cfg: TrainConfig           # a resumed run's own config
    run_dir: Path
    start_epoch: int
    resume_from: str | None
    train_dir: str = ""
    num_classes: int = 0
    done: "TrainResult | None" = None  # a resumed run that had already finished


def _plan_run(cfg: TrainConfig, resume: str | os.PathLike | None) -> _RunPlan:
    """Every check ``train`` makes before it writes or starts anything; needs no Ray.

    A bad input (run folder, checkpoint, shard set, batch size, old checkpoint) raises here,
    so it leaves no run directory behind.
    """
    # Absolute paths: Ray Train workers and actors do not share the driver's working directory.
    run_dir = (Path(resume) if resume else Path(cfg.storage) / cfg.name).resolve()
    start_epoch, resume_from = 0, None
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: run directory not found (nothing to resume)")
        latest, skipped = find_resumable_checkpoint(run_dir)
        for bad, why in skipped:
            print(f"[resume] skipping {bad}: {why}", flush=True)
        if latest is None:
            if skipped:
                raise UserError(f"{run_dir}: no checkpoint to resume from loads ({len(skipped)} skipped; "
                                f"newest: {skipped[0][1]})")
            raise UserError(f"{run_dir}: no checkpoint to resume from")
        state = load_checkpoint(latest)
        stored = from_dict(json.loads(state["config"]), f"{latest}")
        if to_dict(stored) != to_dict(cfg):
            cfg = stored  # the run's own config wins; a resumed run must not change its recipe
        start_epoch, resume_from = int(state["epoch"]), str(latest)
        if start_epoch >= cfg.optim.epochs:
            final = run_dir / "final.pt"
            return _RunPlan(cfg, run_dir, start_epoch, resume_from,
                            done=TrainResult(run_dir, final if final.is_file() else latest,
                                             json.loads(state["metrics"])))
    elif run_dir.exists() and find_latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir}: a run with checkpoints already exists (use --resume {run_dir} "
                        "or another name)")
    train_dir = str(Path(cfg.data.train).resolve())
    num_classes = _num_classes(train_dir)
    rows = read_manifest(train_dir).rows
    if rows < cfg.global_batch:
        raise UserError(f"{train_dir}: {rows} rows are fewer than one global batch of {cfg.global_batch}")
    if cfg.compat.method != "independent":
        _check_old_checkpoint(cfg)
    return _RunPlan(cfg, run_dir, start_epoch, resume_from, train_dir, num_classes)


def _check_resources(plans: list[_RunPlan], *, in_loop: bool) -> None:
    """Refuse, before any extraction or ``fit()``, runs whose phases the cluster cannot hold at
    once (they would wait forever): one ``UserError`` line naming the shortfall and the keys."""
    from unibct_ray.distributed.plan import check_cluster

    for p in plans:
        check_cluster(p.cfg, in_loop=in_loop, num_classes=p.num_classes)


def old_features_dir(cfg: TrainConfig, train_dir: str) -> Path:
    """Where the old-model features of ``train_dir`` live: ``ROOT/<key>`` (see
    :func:`_old_features_key`), ROOT = ``compat.old_features_cache``, by default
    ``STORAGE/old_features``. Every run (method, scenario, Tune trial) with the same old
    checkpoint and shard set reads one copy. Keying hashes the whole checkpoint: ~0.5 s per
    100 MB (sha256, measured here), once per run."""
    root = Path(cfg.compat.old_features_cache or Path(cfg.storage) / OLD_FEATURES_DIR).resolve()
    return root / _old_features_key(cfg.compat.old_checkpoint, train_dir)


@contextlib.contextmanager
def _reuse_if_raced(out: Path) -> Iterator[None]:
    """Two runs extracting one key at once: each writes a staged copy and renames it into place,
    a rename onto an existing directory fails, so the first writer wins whole. The loser's error
    is dropped when the winner's complete copy (its manifest) is there; it reads that copy."""
    try:
        yield
    except (UserError, OSError):
        if not (out / "manifest.json").is_file():
            raise
        print(f"{out}: written by another run meanwhile; reusing it", flush=True)


def _with_old_features(cfg: TrainConfig, run_dir: Path, train_dir: str) -> str:
    """Old-model features over the new training set, extracted once per old checkpoint and shard
    set (:func:`old_features_dir`), keyed by record index -> that shard set."""
    from unibct_ray.distributed.extract import extract_features

    aug = old_features_dir(cfg, train_dir)
    if not (aug / "manifest.json").exists():
        print(f"[{cfg.name}] extracting old-model features of {train_dir} ({cfg.extract_actors} actors) -> {aug}",
              flush=True)
        res = extract_actor_resources(cfg)
        with _reuse_if_raced(aug):
            extract_features(train_dir, aug, checkpoint=Path(cfg.compat.old_checkpoint).resolve(),
                             column=OLD_FEATURE_COLUMN, keep_images=True, actors=cfg.extract_actors,
                             batch_size=cfg.extract_batch, cpus_per_actor=res["CPU"],
                             gpus_per_actor=res.get("GPU", 0.0))
    return str(aug)


def _dataset(cfg: TrainConfig, train_dir: str, clock: str | None) -> tuple["ray.data.Dataset", int]:
    """The training dataset of ``train_dir`` (flips seeded by ``cfg.seed`` and the epoch on
    ``clock``) and the steps per epoch."""
    rows = read_manifest(train_dir).rows
    steps_per_epoch = rows // cfg.global_batch
    if steps_per_epoch < 1:
        raise UserError(f"{train_dir}: {rows} rows are fewer than one global batch of {cfg.global_batch}")
    ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch line says enough
    dataset = training_dataset(train_dir, cfg.data.image_size, cfg.data.flip, cache_bytes=cfg.data.cache_bytes,
                               seed=cfg.seed, shuffle_blocks=cfg.data.shuffle_buffer > 0, clock=clock)
    return dataset, steps_per_epoch


def check_inputs(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> None:
    """Raise the error ``train(cfg, resume=resume)`` would raise for a bad input, without Ray:
    the CLI calls it before it starts or joins a cluster."""
    _plan_run(cfg, resume)


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None,
          on_phase_end: Callable[[Path, int], None] | None = None) -> TrainResult:
    """Run (or resume) a training job on the connected Ray cluster; returns the last checkpoint.

    ``on_phase_end(checkpoint file, epochs done)`` runs in the driver after each training
    phase (a sweep evaluates there, giving early stopping its intermediate results).
    """
    from unibct_ray.distributed.prototypes import build_prototypes

    run = _plan_run(cfg, resume)
    if run.done is not None:
        return run.done
    _check_resources([run], in_loop=False)
    cfg, run_dir, start_epoch, resume_from = run.cfg, run.run_dir, run.start_epoch, run.resume_from
    train_dir, num_classes, method = run.train_dir, run.num_classes, run.cfg.compat.method
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    inputs = None
    if method != "independent":
        train_dir = _with_old_features(cfg, run_dir, train_dir)
        inputs = write_method_inputs(cfg, run_dir, train_dir, num_classes)
    checkpoint = Path(resume_from) if resume_from else None
    with epoch_clock() as clock:
        dataset, steps_per_epoch = _dataset(cfg, train_dir, clock)
        for first, end, refine in plan_phases(start_epoch, cfg.optim.epochs, cfg.compat.refine_epochs, method):
            protos = None
            if _needs_prototypes(cfg, first):
                protos = build_prototypes(cfg, run_dir, train_dir, num_classes, checkpoint, epoch=first, refine=refine)
            run = {
                "config": to_dict(cfg), "num_classes": num_classes, "steps_per_epoch": steps_per_epoch,
                "first_epoch": first, "end_epoch": end, "run_dir": str(run_dir.resolve()), "train_dir": train_dir,
                "resume_from": str(checkpoint) if checkpoint else None,
                "prototypes": str(Path(protos).resolve()) if protos else None, "epoch_clock": clock,
                "method_inputs": inputs,
            }
            checkpoint = _fit(cfg, {"runs": [run]}, dataset, run_dir, f"epochs-{first:03d}-{end:03d}",
                              [(run_dir / "metrics.csv", cfg.name, cfg.optim.epochs)])
            if on_phase_end is not None:
                on_phase_end(checkpoint, end)
    state = load_checkpoint(checkpoint)
    final = run_dir / "final.pt"
    _atomic_copy(checkpoint, final)  # a kill mid-copy must not leave a truncated final.pt
    return TrainResult(run_dir, final, json.loads(state["metrics"]))


# What the runs of one group must share: they read one dataset on one worker group.
_GROUP_KEYS = ("data", "num_workers", "cpus_per_worker", "use_gpu", "global_batch", "seed", "max_failures",
               "extract_actors", "refine_actors")


def train_group(cfgs: list[TrainConfig], *, resumes: list[str | os.PathLike | None] | None = None) -> list[TrainResult]:
    """Train several runs over one shard set in a single ``fit()``; returns one result per config.

    Ray Train's fixed cost per ``fit()`` (starting the controller and the worker group, tens
    of seconds) is paid once instead of once per run and phase: the runs go one after the
    other inside one worker group, and a UniBCT run refines its prototypes inside the loop
    (rank 0 drives the feature-extraction and refinement actors between epochs) instead of
    starting a new ``fit()`` per phase. Each run keeps its own run folder, config.json,
    metrics.csv and final.pt, as with ``train``; its epoch checkpoints serve the restart after a
    failed worker and live under ``<storage>/.groups/`` until the group finishes.

    The runs must share the data settings, the worker group and the seed (``_GROUP_KEYS``), and
    the ones that need old-model features one old checkpoint: they read one dataset (with the
    old features as a column when any run needs them).
    """
    import hashlib

    resumes = list(resumes) if resumes is not None else [None] * len(cfgs)
    if len(resumes) != len(cfgs):
        raise ValueError("train_group: one resume entry per config")
    plans = [_plan_run(c, r) for c, r in zip(cfgs, resumes)]
    todo = [p for p in plans if p.done is None]
    if todo:
        first = to_dict(todo[0].cfg)
        for p in todo[1:]:
            other = to_dict(p.cfg)
            for key in _GROUP_KEYS:
                if other[key] != first[key]:
                    raise ConfigError(f"{p.cfg.name}: {key} differs from {todo[0].cfg.name}'s; the runs of one "
                                      "group share one dataset and worker group (train them separately)")
        olds = {str(Path(p.cfg.compat.old_checkpoint).resolve()) for p in todo if p.cfg.compat.method != "independent"}
        if len(olds) > 1:
            raise ConfigError(f"the runs of one group need one compat.old_checkpoint, got {sorted(olds)}")
        names = [p.cfg.name for p in todo]
        if len(set(p.run_dir for p in todo)) != len(todo):
            raise ConfigError(f"two runs of one group share a run folder: {names}")
        _check_resources(todo, in_loop=True)
        cfg0 = todo[0].cfg
        train_dir = todo[0].train_dir
        for p in todo:
            if p.resume_from is None:  # a fresh run: nothing left from an attempt that died early
                for stale in ("metrics.csv", "final.pt"):
                    (p.run_dir / stale).unlink(missing_ok=True)
            p.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p.run_dir / "config.json", json.dumps(to_dict(p.cfg), indent=2) + "\n")
        needs_old = [p for p in todo if p.cfg.compat.method != "independent"]
        if needs_old:
            train_dir = _with_old_features(needs_old[0].cfg, needs_old[0].run_dir, train_dir)
        inputs = [write_method_inputs(p.cfg, p.run_dir, train_dir, p.num_classes)
                  if p.cfg.compat.method != "independent" else None for p in todo]
        with epoch_clock() as clock:
            dataset, steps_per_epoch = _dataset(cfg0, train_dir, clock)
            runs = [{
                "config": to_dict(p.cfg), "num_classes": p.num_classes, "steps_per_epoch": steps_per_epoch,
                "first_epoch": p.start_epoch, "end_epoch": p.cfg.optim.epochs, "run_dir": str(p.run_dir),
                "train_dir": train_dir, "resume_from": p.resume_from, "prototypes": None, "in_loop": True,
                "epoch_clock": clock,
                "old_checkpoint": str(Path(p.cfg.compat.old_checkpoint).resolve()) if p.cfg.compat.old_checkpoint else "",
                "method_inputs": inp,
            } for p, inp in zip(todo, inputs)]
            key = hashlib.sha256("\n".join(str(p.run_dir) for p in todo).encode()).hexdigest()[:12]
            group_dir = (Path(cfg0.storage) / ".groups" / key).resolve()
            if group_dir.exists():
                shutil.rmtree(group_dir)  # a failed earlier attempt: its checkpoints belong to no run now
            print(f"[group] {len(todo)} runs in one Ray Train fit: {', '.join(names)}", flush=True)
            _fit(cfg0, {"runs": runs}, dataset, group_dir, "runs",
                 [(p.run_dir / "metrics.csv", p.cfg.name, p.cfg.optim.epochs) for p in todo])
        shutil.rmtree(group_dir, ignore_errors=True)
    results = []
    for p in plans:
        if p.done is not None:
            results.append(p.done)
            continue
        final = p.run_dir / "final.pt"
        if not final.is_file():
            raise RuntimeError(f"{p.run_dir}: the group fit finished without final.pt")
        results.append(TrainResult(p.run_dir, final, json.loads(load_checkpoint(final)["metrics"])))
    return results
