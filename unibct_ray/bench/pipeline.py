"""``unibct-ray bench pipeline``: Ray Data -> TorchTrainer against a plain DataLoader loop."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

__all__ = ["bench_pipeline", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "Ray Data -> TorchTrainer vs a plain DataLoader loop"
#: The subcommand's description.
DESCRIPTION = (
    "Training throughput (images/s per epoch) of the Ray pipeline (Ray Data decode +\n"
    "flip in map_batches, one TorchTrainer worker) against a plain PyTorch DataLoader\n"
    "loop with one decode worker process: same model, shards, batch and cores."
)


def _plain_loader_epochs(shards: Path, cfg, epochs: int) -> list[float]:
    """Images/s per epoch of a plain single-process PyTorch loop over the same shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from unibct_ray.data.images import decode_images
    from unibct_ray.data.shards import read_manifest
    from unibct_ray.distributed.train import _build
    from unibct_ray.training import train_step

    m = read_manifest(shards)
    table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in m.files])
    images, labels = table.column("image").to_pylist(), table.column("label").to_numpy()

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            flip = np.array([np.random.random() < 0.5]) if cfg.data.flip else None
            return torch.from_numpy(decode_images([images[i]], cfg.data.image_size, flip)[0]), int(labels[i])

    torch.manual_seed(cfg.seed)
    model = _build(cfg, int(labels.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.effective_lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    # One loader process decodes while the main process trains: the same two cores as the Ray
    # path (one train worker, decoding beside it), as a user of a plain DataLoader would set it.
    loader = torch.utils.data.DataLoader(Rows(), batch_size=cfg.global_batch, shuffle=True, drop_last=True,
                                         num_workers=1, persistent_workers=True, prefetch_factor=4)
    out = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for x, y in loader:
            train_step(model, opt, x, y, clip_params=list(model.backbone.parameters()), clip_norm=5.0)
            n += len(y)
        out.append(n / (time.perf_counter() - t))
    return out


def bench_pipeline(out: Path, identities: int, images_per_identity: int, size: int, epochs: int,
                   backbone: str, batch: int) -> dict:
    """Ray Data -> TorchTrainer (1 worker) vs a plain DataLoader loop: same model, data, batch."""
    import csv

    import torch

    from unibct_ray.config import from_dict
    from unibct_ray.data.shards import read_manifest
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.synth import synthesize
    from unibct_ray.distributed.train import train

    ensure_ray()
    data = out / "synth"
    if not (data / "train.rec").exists():
        synthesize(SynthSpec(identities=identities, images_per_identity=images_per_identity, size=size,
                             count_spread=0.0, eval_identities=0), data, progress=False)
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        convert_rec(data / "train.rec", shards, rows_per_shard=1000, progress=False)
    cfg = from_dict({
        "name": f"pipeline-{int(time.time())}", "data": {"train": str(shards), "image_size": size},
        "model": {"backbone": backbone, "embedding_size": 128}, "optim": {"epochs": epochs, "base_batch": batch},
        "global_batch": batch, "num_workers": 1, "cpus_per_worker": 1, "storage": str(out / "runs"),
    })
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray worker trains with one thread too (cpus_per_worker=1)
    plain = _plain_loader_epochs(shards, cfg, epochs)
    torch.set_num_threads(threads)
    t = time.perf_counter()
    res = train(cfg)
    fit_wall = time.perf_counter() - t
    with open(res.run_dir / "metrics.csv") as f:
        ray_ips = [float(r["images_per_s"]) for r in csv.DictReader(f)]
    steady_plain, steady_ray = float(np.median(plain[1:])), float(np.median(ray_ips[1:]))
    return {
        "images": read_manifest(shards).rows, "size": size, "backbone": backbone, "batch": batch, "epochs": epochs,
        "plain_images_per_s": [round(x, 1) for x in plain],
        "ray_images_per_s": [round(x, 1) for x in ray_ips],
        "steady_ratio_ray_over_plain": round(steady_ray / steady_plain, 3),
        "ray_fit_wall_s": round(fit_wall, 1),
        "note": "per-epoch images/s of the training loop (epoch 1 excluded from the ratio: start-up); "
                "both train with one torch thread and decode on the other core (Ray Data tasks; "
                "one DataLoader worker process)",
    }


def decoded_bytes_per_image(shards: Path, size: int, uint8: bool) -> dict:
    """Object-store bytes per decoded training row (the blocks ``map_batches`` emits), for the
    uint8 decode (the training path) or the float32 one (normalised on the CPU, as before)."""
    from unibct_ray.distributed.data import training_dataset

    ds = training_dataset(str(shards), size, flip=True, cache_bytes=0, seed=0, uint8=uint8).materialize()
    rows = ds.count()
    return {"bytes_per_image": round(ds.size_bytes() / max(rows, 1), 1), "rows": rows}


def first_batch_seconds(shards: Path, size: int, batch: int) -> float:
    """Seconds from building the (streamed, block-shuffled) training dataset to its first batch."""
    from unibct_ray.distributed.data import training_dataset

    t = time.perf_counter()
    ds = training_dataset(str(shards), size, flip=True, cache_bytes=0, seed=0)
    next(iter(ds.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=4 * batch, local_shuffle_seed=0)))
    return time.perf_counter() - t


def lean_decode_figures(out: Path, identities: int, images_per_identity: int, size: int, batch: int) -> dict:
    """uint8 vs float32 bytes per image through the object store, and the time to the first
    batch of a streamed set at the given size and at 4x the size."""
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.synth import synthesize

    ensure_ray()
    res: dict = {"size": size}
    for scale in (1, 4):
        data = out / f"synth-x{scale}"
        if not (data / "train.rec").exists():
            synthesize(SynthSpec(identities=identities * scale, images_per_identity=images_per_identity, size=size,
                                 count_spread=0.0, eval_identities=0), data, progress=False)
        shards = out / f"shards-x{scale}"
        if not (shards / "manifest.json").exists():
            convert_rec(data / "train.rec", shards, rows_per_shard=500, progress=False)
        if scale == 1:
            u8, f32 = decoded_bytes_per_image(shards, size, True), decoded_bytes_per_image(shards, size, False)
            res["object_store_bytes_per_image"] = {"uint8": u8["bytes_per_image"], "float32": f32["bytes_per_image"],
                                                   "float32_over_uint8": round(f32["bytes_per_image"]
                                                                               / u8["bytes_per_image"], 2)}
        first_batch_seconds(shards, size, batch)  # warm: imports, the first Ray Data job's start-up
        res[f"first_batch_s_x{scale}"] = {"rows": identities * scale * images_per_identity,
                                          "seconds": round(first_batch_seconds(shards, size, batch), 2)}
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench_out/pipeline"), help="working directory")
    p.add_argument("--identities", type=int, default=100)
    p.add_argument("--images-per-identity", type=int, default=40)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--backbone", default="r18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lean-only", action="store_true",
                   help="only the decode figures (bytes per image uint8 vs float32, time to the first "
                        "batch at 1x and 4x the data), not the training comparison")


def run(a: argparse.Namespace) -> dict:
    lean = lean_decode_figures(a.out, a.identities, a.images_per_identity, a.size, a.batch)
    if a.lean_only:
        return {"decode": lean}
    return {"decode": lean,
            **bench_pipeline(a.out, a.identities, a.images_per_identity, a.size, a.epochs, a.backbone, a.batch)}


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("pipeline", __doc__, add_arguments, run)
