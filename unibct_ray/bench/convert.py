"""``unibct-ray bench convert``: ``data convert`` against a plain sequential read of the same ``.rec``.

Builds a synthetic MS1M ``.rec`` of a given size and times ``data convert`` against a plain
sequential read of the same file (a straight ``open``/``read`` loop that parses every record,
as a user would write it). The ratio is convert throughput / read throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

__all__ = ["plain_sequential_read", "bench_convert", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "data convert vs a plain sequential read of the same .rec"
#: The subcommand's description.
DESCRIPTION = (
    "Build a synthetic MS1M .rec of --gb gigabytes (reused if OUT/train.rec exists)\n"
    "and time `data convert` (Ray tasks, Ray already started) against a plain\n"
    "sequential read of the same file and a plain sequential write of as many bytes\n"
    "(the output side's bound). Prints JSON; ratio_vs_read = read time / convert time."
)


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


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(a: argparse.Namespace) -> dict:
    return bench_convert(a.out, a.gb, a.size, a.rows_per_shard, a.repeats, a.keep, a.shards_dir, a.cold, a.parallelism)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("convert", __doc__, add_arguments, run)
