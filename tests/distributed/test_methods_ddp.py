"""NCCL and AdvBCT on two gloo workers of Ray Train take the same steps as one process on the
whole batch.

The workers build their model, method and optimizer with the training loop's own builders
(``_build_parts``, ``_build_method``, ``_make_optimizer``) and step with ``train_step``, as
``_train_run`` does; the batches are fixed tensors, so rank r holds rows r*b..(r+1)*b-1 of the
one-process batch. The risky parts: NCCL's queue is all-gathered and must end up holding the
same rows, with the same old logits, on every rank and in the one process; AdvBCT's
discriminator and radii are averaged by their own DDP wrapper and its point-to-set mean is over
the global batch's violating rows.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import cloudpickle
import numpy as np
import torch

from unibct_ray.config import from_dict
from unibct_ray.distributed.train import _build_method, _build_parts, _make_optimizer
from unibct_ray.training import train_step

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

C, D, B, SIZE, SEED, STEPS = 7, 16, 12, 32, 3, 3
QUEUE = 2 * B  # three steps of 12 rows: the first batch falls out of the queue


def _cfg(method: str, world: int):
    return from_dict({"model": {"backbone": "tiny", "embedding_size": D}, "data": {"image_size": SIZE},
                      "num_workers": world, "global_batch": B, "seed": SEED, "head": {"scale": 16.0, "margin": 0.3},
                      "optim": {"epochs": 2},
                      "compat": {"method": method, "old_checkpoint": "unused.pt", "nccl_queue": QUEUE,
                                 "nccl_beta": 0.5, "advbct_hidden": 8}})


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(0, C, (B,), generator=g)
    # old features near a per-class direction, so the queue holds same-class neighbours
    return torch.randn(B, 3, SIZE, SIZE, generator=g), y, torch.randn(B, D, generator=g) + 2 * torch.eye(C, D)[y]


def advbct_inputs(path: Path) -> str:
    """AdvBCT's class metadata for C classes, from synthetic old features (what the driver writes)."""
    from unibct_ray.compat.advbct import inlier_radius
    from unibct_ray.compat.class_geometry import class_centres, distances_to_centres

    g = torch.Generator().manual_seed(7)
    labels = torch.arange(C).repeat(6).numpy()
    old = (torch.randn(len(labels), D, generator=g) + 2 * torch.eye(C, D)[labels]).numpy()
    centres, _ = class_centres(old, labels, C)
    r_max, counts = inlier_radius(distances_to_centres(old, labels, centres), labels, C)
    np.savez(path, centres=centres.astype(np.float32), r_max=(0.8 * r_max).astype(np.float32), counts=counts)
    return str(path)


def run_steps(method_name: str, rank: int, world: int, prepare, inputs: str) -> dict:
    """``STEPS`` training steps of one rank, built and stepped as ``_train_run`` does."""
    from unibct_ray.distributed.train import _full_state, _payload

    torch.manual_seed(SEED)
    cfg = _cfg(method_name, world)
    cpu = torch.device("cpu")
    parts = _build_parts(cfg, C, rank, world, cpu, None, prepare)
    parts.model.eval()  # BatchNorm batch statistics per rank would legitimately differ from the whole batch's
    method = _build_method(cfg, {"method_inputs": inputs}, parts, rank, world, cpu, None, prepare)
    if method.aux is not None:
        method.aux.eval()  # the discriminator's BatchNorm too
    optimizer = _make_optimizer(cfg, parts, method)
    per = B // world
    own = slice(rank * per, (rank + 1) * per)
    losses = []
    for step in range(STEPS):
        x, y, o = _batch(step)
        method.compat.schedule(step, 2 * STEPS, step // 2, cfg.optim.epochs)
        r = train_step(parts.model, optimizer, x[own], y[own], compat=method.compat,
                       weight=method.compat.weight_at(0), old_features=o[own],
                       clip_params=list(parts.backbone.parameters()), clip_norm=0.0,
                       mix=method.mix_for({"index": torch.arange(B)[own], "old_feature": o[own]}, step),
                       head=functools.partial(parts.head, step=step) if parts.parallel else None)
        assert r.applied
        losses.append(r.compat_loss)
    full = _full_state(parts, optimizer, C, world)  # the full head, whichever mode (advbct: parallel on 2)
    out = {"model": parts.backbone.state_dict(), "head": full[0], "losses": losses, "parallel": parts.parallel}
    if method.aux is not None:
        out["compat_state"] = _payload({"config": {}, "num_classes": C}, 0, parts, full, 1, STEPS, None, {},
                                       method.aux)["compat_state"]
    else:
        emb, logits, labels = method.compat.term.queue.contents()
        order = torch.argsort(emb[:, 0])
        out["queue"] = (emb[order], logits[order], labels[order])
    return out


def worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    got = {m: run_steps(m, rank, world, ray.train.torch.prepare_model, config["inputs"]) for m in ("nccl", "advbct")}
    with tempfile.TemporaryDirectory() as d:
        torch.save(got, Path(d) / f"rank{rank}.pt")
        # every rank reports a checkpoint: rank 1's queue must equal rank 0's
        ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))


def test_nccl_and_advbct_two_workers_equal_one_process(ray_session, torch_one_thread, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    inputs = advbct_inputs(tmp_path / "advbct-classes.npz")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"inputs": inputs},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="methods-ddp", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        dist = {r: torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in (0, 1)}

    ident = lambda m, parallel_strategy_kwargs: m  # noqa: E731  one process: no DDP
    ref = {m: run_steps(m, 0, 1, ident, inputs) for m in ("nccl", "advbct")}
    # nccl keeps the replicated head on two workers; advbct runs the model-parallel one
    assert not dist[0]["nccl"]["parallel"] and dist[0]["advbct"]["parallel"]
    for method in ("nccl", "advbct"):
        got = dist[0][method]
        for part in ("model", "head"):
            for k, v in ref[method][part].items():
                torch.testing.assert_close(got[part][k], v, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k: f"{method} {part}.{k}: {m}")
        # DDP averages the ranks' gradients: the mean of the ranks' losses is the one-process loss
        local = [dist[r][method]["losses"] for r in (0, 1)]
        np.testing.assert_allclose(np.mean(local, axis=0), ref[method]["losses"], rtol=1e-4, atol=1e-6)
        assert all(v > 0 for v in ref[method]["losses"])
    # the queue: gathered from both ranks, the same rows and old logits on each and in one process
    assert len(ref["nccl"]["queue"][2]) == QUEUE
    for r in (0, 1):
        for a, b in zip(dist[r]["nccl"]["queue"], ref["nccl"]["queue"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # advbct's trained parts: discriminator and radii moved, equal on every rank and to one process
    trained = ref["advbct"]["compat_state"]
    before = _build_method(_cfg("advbct", 1), {"method_inputs": inputs}, None, 0, 1, torch.device("cpu"), None,
                           ident).aux.state_dict()
    assert set(trained) == set(before)
    for r in (0, 1):
        for k, v in trained.items():
            torch.testing.assert_close(dist[r]["advbct"]["compat_state"][k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(trained["w"], before["w"])
    assert not torch.equal(trained["discriminator.0.weight"], before["discriminator.0.weight"])
    # a checkpoint's compat_state restores them
    again = _build_method(_cfg("advbct", 1), {"method_inputs": inputs}, None, 0, 1, torch.device("cpu"),
                          {"compat_state": trained}, ident).aux.state_dict()
    for k, v in trained.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)
