"""``unibct-ray bench extract``: feature extraction on the Ray actor pool against a plain loop.

Both contenders embed the same synthetic shard set with the same backbone and weights on the
same cores:

- **actor path**: :func:`unibct_ray.distributed.extract.extract_features`, as every
  extraction of a run calls it (an actor pool; each actor reads its pieces of the Parquet
  files, decodes the next batch while it embeds one with one torch thread per whole CPU of
  ``--actor-cpus``, and writes a file per piece; the shard set is renamed into place);
  Ray is started by the bench; by default one actor holding every core (``--actors``,
  ``--actor-cpus``: on 2 cores it ran 0.96x the plain loop's whole call, two one-CPU actors
  0.81-0.85x).
- **plain loop**: a fresh Python process per call, as a user's script would run: it imports
  torch, builds the backbone from the same weights, reads the same Parquet files with pyarrow,
  decodes with the same ``decode_images`` and runs the backbone over batches of the same size
  with ``torch.set_num_threads(cores)``, then saves the features. It runs in the same NHWC
  (``channels_last``) memory format as an actor (``decode_images`` already lays its batches
  out that way) and with the same heap setting (``unibct_ray.heap``: freed activations stay in
  the heap). Its time is the process's, start to exit: like an actor, it pays for its start-up
  and for touching its memory the first time (on this virtual machine a fresh process's first
  ~1 GB of heap costs seconds).

The rounds alternate (plain, actors, plain, actors, ...) so a shared machine slows both alike.
Each contender is timed on two set sizes (``--images`` and ``--small-images``): the whole-call
rate is what a user waits for, and the difference between the sizes gives the per-image
(steady) rate and the fixed cost of a call (starting the actors with torch and the model,
writing the manifest), which a real set of millions of images amortises. The features of the two contenders
are compared by record index (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["plain_extract", "bench_extract", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "feature extraction on the Ray actor pool vs a plain one-process loop"
#: The subcommand's description.
DESCRIPTION = __doc__


def plain_extract(shards: Path, model, size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One process: Parquet -> ``decode_images`` -> backbone in batches (NHWC) -> (index int64
    [n], features float32 [n, d]). Uses the caller's torch thread setting."""
    import pyarrow.parquet as pq
    import torch

    from unibct_ray.data.images import decode_images
    from unibct_ray.data.shards import read_manifest

    model = model.to(memory_format=torch.channels_last)  # as DeviceEmbedder holds it
    index, feats = [], []
    for f in read_manifest(shards).files:
        table = pq.read_table(f, columns=["image", "index"])
        images, keys = table.column("image").to_pylist(), table.column("index").to_numpy()
        for s in range(0, len(images), batch):
            x = decode_images(images[s:s + batch], size, None, keys=keys[s:s + batch])
            with torch.inference_mode():
                t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)  # no copy: already NHWC
                feats.append(model(t).float().numpy())
            index.append(keys[s:s + batch])
    return np.concatenate(index), np.concatenate(feats)


#: The plain loop's process: argv = shards, weights (.pt), size, batch, threads, out (.npz).
_PLAIN_MAIN = """
import sys
from pathlib import Path
import numpy as np
import torch
from unibct_ray.bench.extract import plain_extract
from unibct_ray.heap import keep_freed_memory
from unibct_ray.models.iresnet import build_backbone
keep_freed_memory()
shards, weights, size, batch, threads, out = sys.argv[1:7]
torch.set_num_threads(int(threads))
saved = torch.load(weights, map_location="cpu", weights_only=True)
model = build_backbone(**saved["model_spec"]).eval()
model.load_state_dict(saved["state_dict"])
index, feats = plain_extract(Path(shards), model, int(size), int(batch))
np.savez(out, index=index, feats=feats)
"""


def _plain_process(shards: Path, weights: Path, size: int, batch: int, threads: int, out: Path
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`plain_extract` in a fresh process (``sys.executable``) -> (index, features)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _PLAIN_MAIN, str(shards), str(weights), str(size), str(batch),
                    str(threads), str(out)], check=True)
    with np.load(out, allow_pickle=False) as z:
        return z["index"], z["feats"]


def _read_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A feature shard set -> (index int64 [n], features float32 [n, d]) in stored order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unibct_ray.data.shards import read_manifest
    from unibct_ray.distributed.data import FEATURE_COLUMN, feature_matrix

    table = pa.concat_tables([pq.read_table(f, columns=["index", FEATURE_COLUMN]) for f in read_manifest(path).files])
    return table.column("index").to_numpy(), feature_matrix(table, FEATURE_COLUMN)


def _by_index(index: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return feats[np.argsort(index, kind="stable")]


def bench_extract(out: Path, images: int, small_images: int, size: int, backbone: str, embedding_size: int,
                  batch: int, actors: int, cores: int, rows_per_shard: int, distinct: int, rounds: int,
                  actor_cpus: float = 1.0) -> dict:
    """Time the actor path and the plain loop on ``images`` (and ``small_images``) rows; compare
    their features. Returns the result dict printed by the bench."""
    import torch

    from unibct_ray.bench.common import jpeg_shards, machine, side_by_side, use_package_path
    from unibct_ray.models.iresnet import build_backbone

    sizes = [n for n in dict.fromkeys([images, small_images]) if n > 0]
    sets = {n: jpeg_shards(out / f"shards-{n}", n, size=size, distinct=distinct, rows_per_shard=rows_per_shard)
            for n in sizes}
    torch.manual_seed(0)
    spec = {"name": backbone, "embedding_size": embedding_size, "input_size": size}
    model = build_backbone(**spec).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.pt"
    torch.save({"state_dict": state, "model_spec": spec}, weights)

    use_package_path()
    import ray

    from unibct_ray.distributed.extract import extract_features
    from unibct_ray.distributed.runtime import ensure_ray

    # More logical CPUs than cores (ensure_ray's rule): Ray's own tasks find a CPU beside actors
    # that hold one each. A process already connected keeps its Ray.
    started = not ray.is_initialized()
    ensure_ray(num_cpus=max(4, 2 * cores, int(actors * actor_cpus) + 2))
    try:
        results: dict[str, np.ndarray] = {}

        def plain(n: int):
            def go() -> None:
                got = _plain_process(sets[n], weights, size, batch, cores, out / f"plain-{n}.npz")
                results[f"plain-{n}"] = _by_index(*got)
            return go

        def actor_path(n: int):
            def go() -> None:
                dst = extract_features(sets[n], out / f"features-{n}", state_dict=state, model_spec=spec,
                                       actors=actors, batch_size=batch, cpus_per_actor=actor_cpus,
                                       overwrite=True)
                results[f"actors-{n}"] = _by_index(*_read_features(dst))
            return go

        contenders = {}
        for n in sizes:
            contenders[f"plain-{n}"] = plain(n)
            contenders[f"actors-{n}"] = actor_path(n)
        load_before = machine()
        times = side_by_side(contenders, repeats=rounds)
    finally:
        if started:
            ray.shutdown()

    best = {k: min(v) for k, v in times.items()}
    res: dict = {
        "backbone": backbone, "size": size, "embedding_size": embedding_size, "batch": batch, "cores": cores,
        "actors": actors, "actor_cpus": actor_cpus, "rows_per_shard": rows_per_shard, "rounds": rounds,
        "machine_before": load_before, "machine_after": machine(),
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }
    n = images
    plain_ips, actor_ips = n / best[f"plain-{n}"], n / best[f"actors-{n}"]
    res["images"] = n
    res["plain_images_per_s"] = round(plain_ips, 2)
    res["actors_images_per_s"] = round(actor_ips, 2)
    res["ratio_actors_over_plain"] = round(actor_ips / plain_ips, 3)
    if len(sizes) == 2:
        m = small_images
        steady = {}
        for who in ("plain", "actors"):
            per_image = (best[f"{who}-{n}"] - best[f"{who}-{m}"]) / (n - m)
            steady[who] = {"images_per_s": round(1.0 / per_image, 2) if per_image > 0 else None,
                           "fixed_s": round(best[f"{who}-{n}"] - n * per_image, 2)}
        res["small_images"] = m
        res["steady"] = steady
        if steady["plain"]["images_per_s"] and steady["actors"]["images_per_s"]:
            res["steady_ratio_actors_over_plain"] = round(
                steady["actors"]["images_per_s"] / steady["plain"]["images_per_s"], 3)
    diff = float(np.abs(results[f"actors-{n}"] - results[f"plain-{n}"]).max())
    scale = float(np.abs(results[f"plain-{n}"]).max())
    res["max_abs_diff"] = diff
    res["max_abs_feature"] = round(scale, 4)
    res["same_features"] = bool(diff <= 1e-4 * max(scale, 1.0))
    res["goal"] = {"ratio_actors_over_plain": 0.9, "met": res["ratio_actors_over_plain"] >= 0.9}
    res["ok"] = res["same_features"]
    res["note"] = ("whole-call images/s at --images (best of the rounds); steady = per-image rate from the "
                   "difference between the two sizes, fixed_s = the rest of a call (actor start-up, "
                   "the manifest); plain loop: a fresh process per call (start to exit), torch.set_num_threads(cores); "
                   "actors: one torch thread per whole CPU of --actor-cpus; both NHWC with freed memory kept in the heap")
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench_out/extract"), help="working directory (shards are kept)")
    p.add_argument("--images", type=int, default=640, help="rows of the measured shard set")
    p.add_argument("--small-images", type=int, default=128,
                   help="rows of a second, smaller set: the size difference separates the per-image rate from "
                        "the fixed cost of a call (0: skip)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--backbone", default="r18")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (both contenders)")
    p.add_argument("--cores", type=int, default=None, help="cores to use (default: all of this machine's)")
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default: --cores / --actor-cpus)")
    p.add_argument("--actor-cpus", type=float, default=None,
                   help="CPUs per actor (extract_cpus of a config); an actor runs one torch thread per whole CPU "
                        "it holds. Default: all --cores, i.e. one actor with every core's threads, the faster "
                        "arrangement on a CPU node (--actor-cpus 1: one one-thread actor per core)")
    p.add_argument("--rows-per-shard", type=int, default=50_000,
                   help="rows per Parquet file (data convert's default). extract_features cuts files into "
                        "pieces of about a quarter of an actor's share, so a set of fewer files than actors "
                        "still feeds every actor")
    p.add_argument("--distinct", type=int, default=256, help="distinct images, repeated to fill the set")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each is reported")


def run(a: argparse.Namespace) -> dict:
    from unibct_ray.errors import UserError

    cores = a.cores or os.cpu_count() or 1
    actor_cpus = float(cores if a.actor_cpus is None else a.actor_cpus)
    if actor_cpus <= 0:
        raise UserError(f"--actor-cpus must be > 0, got {a.actor_cpus}")
    actors = a.actors or max(1, int(cores // actor_cpus))
    if a.images < 1 or a.small_images < 0 or a.small_images >= a.images and a.small_images:
        raise UserError(f"--images ({a.images}) must be >= 1 and larger than --small-images ({a.small_images})")
    if a.rounds < 1 or a.batch < 1 or actors < 1 or a.rows_per_shard < 1:
        raise UserError("--rounds, --batch, --actors and --rows-per-shard must be >= 1")
    t = time.perf_counter()
    res = bench_extract(a.out, a.images, a.small_images, a.size, a.backbone, a.embedding_size, a.batch, actors,
                        cores, a.rows_per_shard, a.distinct, a.rounds, actor_cpus=actor_cpus)
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("extract", __doc__, add_arguments, run)
