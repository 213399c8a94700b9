"""``unibct-ray bench``: measured speed figures, side by side in one run.

``bench convert``: builds a synthetic MS1M ``.rec`` of a given size and times ``data convert``
against a plain sequential read of the same file (a straight ``open``/``read`` loop that
parses every record, as a user would write it). The ratio is convert throughput / read
throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

__all__ = ["add_bench_parser", "plain_sequential_read", "bench_convert"]


def plain_sequential_read(rec_path: Path) -> tuple[int, int]:
    """Read every record of a ``.rec`` in file order -> (records, image bytes).

    Independent of the project's reader on purpose: buffered ``read`` calls, chunk joining
    and IRHeader parsing written out plainly.
    """
    magic = 0xCED7230A
    records = image_bytes = 0
    with open(rec_path, "rb", buffering=1 << 20) as f:
        pending = b""
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            m, lrec = struct.unpack("<II", head)
            if m != magic:
                raise ValueError(f"{rec_path}: bad magic at {f.tell() - 8}")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = f.read(length)
            f.read((4 - length % 4) % 4)
            if cflag == 0:
                payload = data
            elif cflag == 1:
                pending = data
                continue
            else:
                pending += struct.pack("<I", magic) + data
                if cflag == 2:
                    continue
                payload, pending = pending, b""
            flag = struct.unpack_from("<I", payload)[0]
            image_bytes += len(payload) - 24 - 4 * flag
            records += 1
    return records, image_bytes


def plain_sequential_write(nbytes: int, path: Path) -> None:
    """Write ``nbytes`` to a new file in 4 MiB blocks: the output side's own bound."""
    block = b"\x5a" * (4 << 20)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    path.unlink()


def evict_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path`` from the page cache (a cold read next time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _build_rec(path: Path, gb: float, size: int, images_per_class: int, seed: int) -> dict:
    from unibct_ray.data.ms1m import write_ms1m
    from unibct_ray.data.synth import SynthSpec, render_training_images

    spec = SynthSpec(size=size, seed=seed)
    pool: list[bytes] = []
    for ident in range(40):
        pool.extend(render_training_images(spec, ident, 10))
    mean = float(np.mean([len(p) for p in pool]))
    n = int(math.ceil(gb * 1e9 / (mean + 40)))

    def images():
        for i in range(n):
            yield i // images_per_class, pool[(i * 7919) % len(pool)]

    t = time.perf_counter()
    write_ms1m(path, images())
    return {"images": n, "classes": -(-n // images_per_class), "mean_jpeg_bytes": round(mean),
            "rec_bytes": path.stat().st_size, "write_s": round(time.perf_counter() - t, 2)}


def bench_convert(out: Path, gb: float, size: int, rows_per_shard: int, repeats: int, keep: bool,
                  shards_dir: Path | None = None, cold: bool = False, parallelism: int | None = None) -> dict:
    import ray

    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray

    out.mkdir(parents=True, exist_ok=True)
    rec = out / "train.rec"
    info = _build_rec(rec, gb, size, images_per_class=50, seed=0) if not rec.exists() else {"rec_bytes": rec.stat().st_size}
    dst = (shards_dir or out) / "shards"
    dst.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t
    runs = []
    for r in range(repeats):
        if cold:
            evict_page_cache(rec)
        t = time.perf_counter()
        n, nbytes = plain_sequential_read(rec)
        seq = time.perf_counter() - t
        t = time.perf_counter()
        plain_sequential_write(info["rec_bytes"], dst.parent / "write-probe.bin")
        wr = time.perf_counter() - t
        if cold:
            evict_page_cache(rec)
        t = time.perf_counter()
        m = convert_rec(rec, dst, rows_per_shard=rows_per_shard, overwrite=True, progress=False,
                        parallelism=parallelism)
        conv = time.perf_counter() - t
        assert m.rows == n - 1 - m.classes, (m.rows, n, m.classes)  # records = images + header + identities
        runs.append({"sequential_read_s": round(seq, 2), "sequential_write_s": round(wr, 2),
                     "convert_s": round(conv, 2), "ratio_vs_read": round(seq / conv, 3),
                     "ratio_vs_write": round(wr / conv, 3)})
    best = min(runs[1:] or runs, key=lambda x: x["convert_s"])
    result = {
        "rec": info,
        "shards_dir": str(dst),
        "cold_cache": cold,
        "cpus": ray.cluster_resources().get("CPU"),
        "ray_start_s": round(ray_start, 2),
        "rows_per_shard": rows_per_shard,
        "parallelism": parallelism,
        "shards": len(m.shards),
        "runs": runs,
        "note": "run 1 includes starting Ray's worker processes; later runs reuse them",
        "sequential_read_MB_per_s": round(info["rec_bytes"] / 1e6 / best["sequential_read_s"], 1),
        "sequential_write_MB_per_s": round(info["rec_bytes"] / 1e6 / best["sequential_write_s"], 1),
        "convert_MB_per_s": round(info["rec_bytes"] / 1e6 / best["convert_s"], 1),
        "convert_images_per_s": round(m.rows / best["convert_s"]),
    }
    if not keep:
        shutil.rmtree(dst, ignore_errors=True)
    return result


def _cmd_bench_convert(a: argparse.Namespace) -> int:
    res = bench_convert(a.out, a.gb, a.size, a.rows_per_shard, a.repeats, a.keep, a.shards_dir, a.cold, a.parallelism)
    print(json.dumps(res, indent=2))
    return 0


def bench_search(gallery_size: int, queries: int, dim: int, k: int, shards: int, seed: int) -> dict:
    """One FAISS flat index using every core vs ``shards`` Ray actors (one thread each), same top-k.

    Two measurements: end to end (``RayShardedKNN`` as the evaluator calls it: actors started,
    shards shipped through the object store, searched, merged) and search only (shards already
    loaded in their actors, as a long-lived gallery service would hold them: the timed part is
    the parallel search and the exact merge; the one index is likewise already built).
    """
    import faiss
    import ray

    from unibct_ray.distributed.knn import FaissShardActor, RayShardedKNN
    from unibct_ray.distributed.runtime import ensure_ray, spread_placement
    from unibct_ray.metrics.knn import FaissKNN, merge_topk

    rng = np.random.default_rng(seed)
    gal = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    q = gal[rng.integers(0, gallery_size, queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
    ensure_ray()
    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(cores)
    # end to end
    t = time.perf_counter()
    s1, i1 = FaissKNN(index="flat")(gal, q, k)
    one = time.perf_counter() - t
    t = time.perf_counter()
    s2, i2 = RayShardedKNN(shards=shards, index="flat")(gal, q, k)
    sharded = time.perf_counter() - t
    # search only: the index built / the shards loaded beforehand
    knn = FaissKNN(index="flat")
    index = knn.build(gal)
    t = time.perf_counter()
    s3, i3 = knn.search_built(index, gal, q, k)
    one_search = time.perf_counter() - t
    del index
    bounds = np.linspace(0, gallery_size, shards + 1).astype(int)
    with spread_placement(shards) as strategies:
        actors = [FaissShardActor.options(scheduling_strategy=strategies[i]).remote() for i in range(shards)]
        ray.get([a.load.remote(gal[bounds[i]:bounds[i + 1]]) for i, a in enumerate(actors)])
        ray.get([a.build.remote("flat", 1024, 32, 32) for a in actors])
        q_ref = ray.put(q)
        t = time.perf_counter()
        parts = ray.get([a.search.remote(q_ref, k, "flat", 1024, 32, 32) for a in actors])
        s4, i4 = merge_topk(parts, k, offsets=bounds[:-1].tolist())
        sharded_search = time.perf_counter() - t
        for a in actors:
            ray.kill(a)
    return {
        "gallery": gallery_size, "queries": queries, "dim": dim, "k": k, "cores": cores,
        "one_index_threads": cores, "shards": shards, "ray_nodes": len(ray.nodes()),
        "end_to_end": {
            "one_index_s": round(one, 2), "one_index_qps": round(queries / one, 1),
            "sharded_s": round(sharded, 2), "sharded_qps": round(queries / sharded, 1),
            "speedup": round(one / sharded, 3), "identical_topk": bool(np.array_equal(i1, i2)),
            "max_score_diff": float(np.abs(s1 - s2).max()),
            "note": "index built in the call; sharded: actors started, shards shipped, searched, merged",
        },
        "search_only": {
            "one_index_s": round(one_search, 2), "one_index_qps": round(queries / one_search, 1),
            "sharded_s": round(sharded_search, 2), "sharded_qps": round(queries / sharded_search, 1),
            "speedup": round(one_search / sharded_search, 3),
            "identical_topk": bool(np.array_equal(i3, i4) and np.array_equal(i1, i4)),
            "note": "index built / shards loaded beforehand; timed: the searches and the exact merge",
        },
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def _cmd_bench_search(a: argparse.Namespace) -> int:
    print(json.dumps(bench_search(a.gallery, a.queries, a.dim, a.k, a.shards, a.seed), indent=2))
    return 0


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
    loader = torch.utils.data.DataLoader(Rows(), batch_size=cfg.global_batch, shuffle=True, drop_last=True,
                                         num_workers=0)
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
                "both train with one torch thread; Ray Data decodes on the other core",
    }


def _cmd_bench_pipeline(a: argparse.Namespace) -> int:
    print(json.dumps(bench_pipeline(a.out, a.identities, a.images_per_identity, a.size, a.epochs,
                                    a.backbone, a.batch), indent=2))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction, formatter: type) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks (figures quoted in the README)",
                           description="Speed benchmarks, measured side by side in one run.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bsub.add_parser(
        "convert", formatter_class=formatter,
        help="data convert vs a plain sequential read of the same .rec",
        description="Build a synthetic MS1M .rec of --gb gigabytes (reused if OUT/train.rec exists)\n"
                    "and time `data convert` (Ray tasks, Ray already started) against a plain\n"
                    "sequential read of the same file and a plain sequential write of as many bytes\n"
                    "(the output side's bound). Prints JSON; ratio_vs_read = read time / convert time.")
    p.add_argument("--out", type=Path, default=Path("bench_out/convert"), help="working directory")
    p.add_argument("--gb", type=float, default=1.0, help="size of the synthetic .rec in GB (1e9 bytes)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--rows-per-shard", type=int, default=50_000, help="as in `data convert`")
    p.add_argument("--repeats", type=int, default=3, help="alternating read/write/convert rounds")
    p.add_argument("--shards-dir", type=Path, default=None,
                   help="where the shards go (default: OUT); e.g. /dev/shm to take the disk out")
    p.add_argument("--parallelism", type=int, default=None, help="as in `data convert`")
    p.add_argument("--cold", action="store_true", help="drop the .rec from the page cache before each step")
    p.add_argument("--keep", action="store_true", help="keep the converted shards")
    p.set_defaults(run=_cmd_bench_convert)

    p = bsub.add_parser(
        "search", formatter_class=formatter,
        help="FAISS gallery shards on Ray actors vs one index",
        description="Exact inner-product top-k of --queries against a random --gallery: one FAISS flat\n"
                    "index with all cores vs --shards Ray actors holding a slice each (one thread each),\n"
                    "merged exactly. Two timings: end to end (actors started and shards shipped inside\n"
                    "the timed call, as `eval` does once per run) and search only (index built and shards\n"
                    "loaded beforehand, as a long-lived gallery holds them). Prints JSON with QPS, the\n"
                    "speed-ups and whether the top-k are identical.")
    p.add_argument("--gallery", type=int, default=1_000_000, help="gallery rows")
    p.add_argument("--queries", type=int, default=10_000, help="query rows")
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--shards", type=int, default=2, help="Ray actors, one gallery slice each")
    p.add_argument("--seed", type=int, default=0, help="random data seed")
    p.set_defaults(run=_cmd_bench_search)

    p = bsub.add_parser(
        "pipeline", formatter_class=formatter,
        help="Ray Data -> TorchTrainer vs a plain DataLoader loop",
        description="Training throughput (images/s per epoch) of the Ray pipeline (Ray Data decode +\n"
                    "flip in map_batches, one TorchTrainer worker) against a plain single-process\n"
                    "PyTorch DataLoader loop: same model, same shards, same batch, same machine.")
    p.add_argument("--out", type=Path, default=Path("bench_out/pipeline"), help="working directory")
    p.add_argument("--identities", type=int, default=100)
    p.add_argument("--images-per-identity", type=int, default=40)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--backbone", default="r18")
    p.add_argument("--batch", type=int, default=64)
    p.set_defaults(run=_cmd_bench_pipeline)
