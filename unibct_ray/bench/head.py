"""``unibct-ray bench head``: the replicated margin head against the model-parallel one.

Two gloo processes (torch.multiprocessing) train the same small backbone with a full-size
head (default 93,431 classes x 512, MS1Mv3) in both modes, one after the other in one run:

* replicated: DDP over backbone + head, every rank holds all centres and all-reduces their
  gradient every step;
* parallel: DDP over the backbone only, each rank holds ``C / world`` centres
  (:class:`unibct_ray.models.heads.ParallelMarginHead`).

The bytes DDP all-reduces are counted by a communication hook that adds up the size of every
bucket it is handed (then all-reduces it as DDP's default hook does); the head's own
collectives (all-gather of embeddings and labels, the softmax's max/sum reductions) are
counted from their shapes. Per-rank head memory is measured from the parameters and the
optimizer's momentum buffers after the steps, beside ``C_r x d x 4 x (1 + optimizer states)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["bench_head", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "replicated vs model-parallel margin head: bytes all-reduced, step time, head memory"
#: The subcommand's description.
DESCRIPTION = (
    "Per-step bytes all-reduced by DDP (counted by a communication hook), step time and\n"
    "per-rank head memory of the replicated head against the model-parallel head, on\n"
    "gloo processes with a small backbone and a full-size head."
)


def _worker(rank: int, world: int, port: int, mode: str, a: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from unibct_ray.distributed.train import _build, ddp_buffer_kwargs
    from unibct_ray.config import from_dict
    from unibct_ray.models.heads import ParallelMarginHead, margin_function
    from unibct_ray.training import train_step

    torch.set_num_threads(max(1, a["threads"]))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = from_dict({"model": {"backbone": a["backbone"], "embedding_size": a["d"]},
                     "data": {"image_size": a["size"]}, "num_workers": world, "global_batch": a["batch"]})
    torch.manual_seed(0)
    counted = {"bytes": 0}

    def counting_hook(state, bucket):
        counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(None, bucket)

    if mode == "replicated":
        module = _build(cfg, a["classes"])
        model = DistributedDataParallel(module, **ddp_buffer_kwargs())
        head, head_fn = module.head, None
        params = [p for p in module.parameters() if p.requires_grad]
        backbone = module.backbone
    else:
        backbone = _build(cfg, 0).backbone
        head = ParallelMarginHead(a["classes"], a["d"], margin_function("arcface"), rank, world, grad_scale=world)
        model = DistributedDataParallel(backbone, **ddp_buffer_kwargs())
        params = [p for p in backbone.parameters() if p.requires_grad] + [head.weight]

        def head_fn(emb, labels):
            return head(emb, labels)
    model.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    per = a["batch"] // world
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(a["warmup"] + a["steps"]):
        x = torch.randn(per, 3, a["size"], a["size"], generator=g)
        y = torch.randint(0, a["classes"], (per,), generator=g)
        if step == a["warmup"]:
            counted["bytes"] = 0
        dist.barrier()
        t = time.perf_counter()
        train_step(model, opt, x, y, clip_params=list(backbone.parameters()), clip_norm=5.0, head=head_fn)
        dist.barrier()
        times.append(time.perf_counter() - t)
    mom = opt.state[head.weight].get("momentum_buffer")
    head_bytes = head.weight.numel() * 4 + (mom.numel() * mom.element_size() if mom is not None else 0)
    res = {
        "allreduce_bytes_per_step": counted["bytes"] / a["steps"],
        "ddp_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "step_s": sorted(times[a["warmup"]:])[len(times[a["warmup"]:]) // 2],
        "head_rows": int(head.weight.shape[0]),
        "head_bytes_measured": head_bytes,
    }
    if rank == 0:
        Path(out).write_text(json.dumps(res))  # numbers only: JSON, never a pickle
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_head(classes: int = 93_431, d: int = 512, world: int = 2, batch: int = 64, size: int = 32,
               backbone: str = "tiny", steps: int = 3, warmup: int = 1, threads: int = 1) -> dict:
    """Both head modes on ``world`` gloo processes; one dict of figures per mode."""
    import torch.multiprocessing as mp

    a = {"classes": classes, "d": d, "batch": batch, "size": size, "backbone": backbone, "steps": steps,
         "warmup": warmup, "threads": threads}
    out: dict = {"classes": classes, "embedding_size": d, "world": world, "global_batch": batch,
                 "backbone": f"{backbone} at {size} px", "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("replicated", "parallel"):
            path = str(Path(tmp) / f"{mode}.json")
            mp.spawn(_worker, args=(world, _free_port(), mode, a, path), nprocs=world)
            r = json.loads(Path(path).read_text())
            rows = classes if mode == "replicated" else math.ceil(classes / world)
            r["head_bytes_formula"] = rows * d * 4 * (1 + 1)  # weights + SGD momentum
            b = batch
            # the parallel head's own collectives per step, from their shapes: all-gather of
            # embeddings [b, d] fp32 and labels [b] int64, a max [b] and a sum [b, 3] all-reduce
            r["head_collective_bytes_per_step"] = 0 if mode == "replicated" else b * d * 4 + b * 8 + b * 4 + b * 3 * 4
            out[mode] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    rep, par = out["replicated"], out["parallel"]
    out["allreduce_ratio_replicated_over_parallel"] = round(rep["allreduce_bytes_per_step"]
                                                            / max(par["allreduce_bytes_per_step"], 1), 1)
    out["step_time_ratio_replicated_over_parallel"] = round(rep["step_s"] / max(par["step_s"], 1e-9), 2)
    out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["note"] = ("allreduce bytes: DDP buckets counted by a comm hook, per rank per step; head memory: "
                   "centres + momentum per rank; step_s: median over the measured steps")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=int, default=93_431, help="classes of the head (MS1Mv3: 93,431)")
    p.add_argument("--d", type=int, default=512, help="embedding size")
    p.add_argument("--world", type=int, default=2, help="gloo worker processes")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--size", type=int, default=32, help="image size of the (shrunk) backbone")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")


def run(a: argparse.Namespace) -> dict:
    return bench_head(a.classes, a.d, a.world, a.batch, a.size, a.backbone, a.steps, a.warmup, a.threads)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("head", __doc__, add_arguments, run)
