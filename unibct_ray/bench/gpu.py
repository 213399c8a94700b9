"""``unibct-ray bench gpu``: the GPU check of a one-GPU machine (~5-8 minutes on one H100).

Three measurements, each against a plain single-process torch loop on the same GPU (the
ceiling: the same model, batch, AMP and optimizer, the images decoded once in this process and
held in pinned host batches, so the loop measures the GPU and the host-to-device copy only):

1. **training**: r50 at 112 px through the real Ray Train path (``distributed.train.train``
   with ``use_gpu: true``, one worker, ``amp: true``; Ray Data decodes and flips the JPEG
   shards on the CPUs) for ``--train-epochs`` epochs of ``--train-steps`` steps; images/s of
   the epochs after the first (start-up, cuDNN autotuning) from the run's ``metrics.csv``.
   Goal: >= 0.9x the plain loop.
2. **extraction**: the trained checkpoint over a larger shard set through the real actor path
   (``distributed.extract.extract_features`` with ``gpus_per_actor``: each actor decodes its
   batches on its CPU and embeds them on its GPU share under fp16 autocast). Each contender
   runs on two set sizes: the difference gives the per-image (steady) rate, the rest the fixed
   cost of a call (actor start-up, writing). Goal: steady rate >= 0.9x the plain loop.
   The features of both are compared by record index.
3. **refinement**: ``compat.prototypes.refine_prototypes(..., device="cuda")`` on a class set
   of MS1M-like sizes (lognormal, mean ~55, up to 600 images) against a plain per-class torch
   loop on the same GPU; rows/s of each and the max difference of the prototypes.

GPU memory: the plain loops report ``torch.cuda.max_memory_allocated`` (and the allocator's
reserved peak). A Ray worker or actor is another process, so for every phase a thread samples
``nvidia-smi`` every 0.2 s: the peak of the GPU's used memory minus its value before the phase
(``nvidia_smi_peak_mib``: the worker's or actors' allocator cache plus their CUDA contexts,
~0.5 GB each; the plain loops' figure is measured the same way, but this process's context
exists before its phases, so it holds the cache only). A training run whose ``metrics.csv``
carries ``gpu_max_allocated`` (bytes, per epoch) is reported with it too.

Then ``pytest -m gpu`` runs the tests marked ``gpu`` and the result holds their counts; the
command exits 1 if one failed or the features disagree (after printing everything).

Without CUDA the command exits 2 with one line, unless ``--allow-cpu``: then every phase runs
on the CPU at smoke sizes (tiny backbone, a few steps; the same code paths, no goals).
Runs as ``unibct-ray bench gpu`` or ``python -m unibct_ray.bench.gpu`` from a checkout
(``PYTHONPATH=.``); it needs torch, ray, pyarrow and pillow, not faiss.

Why one file of ~620 lines: a GPU machine without this project's venv runs the whole check as
``python -m unibct_ray.bench.gpu``; its phases share the data set, the timing and the GPU
memory sampler.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GPU_SIZES", "CPU_SMOKE_SIZES", "GpuMemorySampler", "plain_train", "plain_extract", "loop_refine_torch",
           "run_marked_tests", "bench_gpu", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "GPU check: Ray Train, actor extraction and refinement vs plain loops on one GPU, then pytest -m gpu"
#: The subcommand's description.
DESCRIPTION = __doc__

#: Defaults on a GPU: each measurement lasts >= 20 s after warm-up on one H100 (r50 at 112 px
#: fp16: ~1,500-3,000 img/s training, ~10,000 img/s extraction) and the whole run, synthesis
#: and tests included, stays under 8 minutes.
GPU_SIZES: dict[str, Any] = {
    "backbone": "r50", "size": 112, "embedding_size": 512, "batch": 256, "classes": 2000,
    "train_steps": 240, "train_epochs": 2, "plain_warmup_steps": 20, "cpus_per_worker": 2.0,
    "distinct": 4096, "extract_images": 204_800, "extract_small_images": 51_200, "extract_batch": 256,
    "extract_gpus": 0.25, "extract_actors": None, "rows_per_shard": 8192,
    "refine_classes": 10_000, "refine_d": 512,
}
#: ``rows_per_shard``: Ray Data reads a Parquet file as one block and an actor takes a block
#: whole, so a set of fewer files than actors leaves actors idle; 8,192 gives the extraction set
#: 25 files for 4 actors (MS1M at data convert's 50,000 rows per file has 103).
#: ``--allow-cpu`` without CUDA: the same code paths at sizes a CPU test runs in well under a minute.
CPU_SMOKE_SIZES: dict[str, Any] = {
    "backbone": "tiny", "size": 32, "embedding_size": 32, "batch": 16, "classes": 8,
    "train_steps": 2, "train_epochs": 2, "plain_warmup_steps": 1, "cpus_per_worker": 1.0,
    "distinct": 32, "extract_images": 96, "extract_small_images": 0, "extract_batch": 32,
    "extract_gpus": 0.25, "extract_actors": 1, "rows_per_shard": 48,
    "refine_classes": 40, "refine_d": 16,
}


class GpuMemorySampler:
    """Peak GPU memory used while a block runs, from ``nvidia-smi`` (any process on the GPU).

    ``peak_mib - base_mib`` is what the block added: a Ray worker's or actor's CUDA context and
    allocator cache, which ``torch.cuda`` in this process cannot see. ``available`` is False
    where ``nvidia-smi`` is missing (the figures are then None).
    """

    def __init__(self, enabled: bool, gpu: int = 0, period_s: float = 0.2):
        self.gpu, self.period_s = gpu, period_s
        self.available = enabled and shutil.which("nvidia-smi") is not None and self._used() is not None
        self.base_mib: float | None = None
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", f"--id={self.gpu}", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            used = self._used()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0.0, used)

    def __enter__(self) -> "GpuMemorySampler":
        if self.available:
            self.base_mib = self._used()
            self.peak_mib = self.base_mib
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()

    def added_mib(self) -> float | None:
        """Peak minus the value before the block (None without ``nvidia-smi``)."""
        if not self.available or self.peak_mib is None or self.base_mib is None:
            return None
        return round(self.peak_mib - self.base_mib, 1)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decoded_batches(shards: Path, count: int, batch: int, size: int, device) -> list[tuple[Any, Any]]:
    """The first ``count`` rows of ``shards`` decoded once (``decode_images``, no flip) ->
    ``[(images float32 [batch, 3, S, S], labels int64 [batch])]``, in pinned memory on CUDA."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from unibct_ray.data.images import decode_images
    from unibct_ray.data.shards import read_manifest

    tables, rows = [], 0
    for f in read_manifest(shards).files:
        if rows >= count:
            break
        tables.append(pq.read_table(f, columns=["image", "label"]))
        rows += tables[-1].num_rows
    table = pa.concat_tables(tables).slice(0, max(batch, count - count % batch))
    images, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
    out = []
    for s in range(0, len(images) - batch + 1, batch):
        x = torch.from_numpy(decode_images(images[s:s + batch], size))
        y = torch.from_numpy(labels[s:s + batch].astype(np.int64))
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x, y))
    return out


def plain_train(cfg, num_classes: int, batches: list, steps: int, warmup: int, device) -> dict[str, Any]:
    """The ceiling of the Ray Train path: the same module (``_build``), SGD, poly lr, gradient
    clip, GradScaler + fp16 autocast on CUDA (``cfg.amp``), one process, pre-decoded batches
    cycled from pinned host memory (``non_blocking`` copies). -> images/s and peak memory."""
    import torch

    from unibct_ray.distributed.train import _build, poly_lr
    from unibct_ray.training import train_step

    torch.manual_seed(cfg.seed)
    model = _build(cfg, num_classes).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.effective_lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    amp = device.type == "cuda" and cfg.amp
    scaler = torch.amp.GradScaler("cuda") if amp else None
    clip = list(model.backbone.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = poly_lr(cfg.effective_lr, i, steps + warmup, cfg.optim.poly_power)
        return train_step(model, opt, x, y, clip_params=clip, clip_norm=cfg.optim.clip_grad_norm, scaler=scaler,
                          autocast_device="cuda" if amp else None).loss

    for i in range(warmup):
        step(i)
    _sync(device)
    t = time.perf_counter()
    losses = [step(warmup + i) for i in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - t
    out: dict[str, Any] = {"images_per_s": round(steps * batches[0][0].shape[0] / seconds, 1),
                           "seconds": round(seconds, 2), "steps": steps, "warmup_steps": warmup,
                           "last_loss": round(losses[-1], 4), "finite": bool(np.isfinite(losses).all())}
    if device.type == "cuda":
        out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["max_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def plain_extract(model, batches: list, images: int, device) -> tuple[float, np.ndarray]:
    """The ceiling of the actor path: pre-decoded batches (cycled to ``images`` rows) through
    ``model`` in NHWC memory format, as the actors run it, under fp16 autocast on CUDA (float32 on the CPU), features copied back to the
    host each batch as an actor does -> (seconds, float32 features of the first ``len(batches)``
    batches, i.e. of the distinct images in row order)."""
    import contextlib

    import torch

    b = batches[0][0].shape[0]
    n_batches = max(1, images // b)
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    first = []
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode(), amp:
        for i in range(n_batches):
            x = batches[i % len(batches)][0].to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)  # the actors' layout (DeviceEmbedder)
            f = model(x).float().cpu().numpy()  # the host copy waits for the kernels, as in an actor
            if i < len(batches):
                first.append(f)
    seconds = time.perf_counter() - t
    return seconds, np.concatenate(first)


def loop_refine_torch(old: np.ndarray, new: np.ndarray, labels: np.ndarray, num_classes: int, device,
                      lam: float = 0.9, tau: float = 0.05):
    """The plain per-class refinement on ``device`` (label-sorted rows; ARCHITECTURE §5):
    ``S = N^ N^T / tau`` (diagonal -inf), row softmax ``P``, ``O' = (1 - lam) solve(I - lam P, O)``,
    ``p_c = normalise(mean O')``; one class keeps its normalised old feature -> float32 [C, d] (host)."""
    import torch

    o_all = torch.from_numpy(old).to(device)
    n_all = torch.from_numpy(new).to(device)
    bounds = np.searchsorted(labels, np.arange(num_classes + 1))
    out = torch.zeros(num_classes, old.shape[1], device=device)
    for c in range(num_classes):
        o, n = o_all[bounds[c]:bounds[c + 1]], n_all[bounds[c]:bounds[c + 1]]
        if len(o) == 0:
            continue
        if len(o) == 1:
            out[c] = o[0] / o[0].norm()
            continue
        nh = n / n.norm(dim=1, keepdim=True)
        s = nh @ nh.T / tau
        s.fill_diagonal_(float("-inf"))
        p = torch.softmax(s, dim=1)
        eye = torch.eye(len(o), device=device)
        m = ((1 - lam) * torch.linalg.solve(eye - lam * p, o)).mean(dim=0)
        out[c] = m / m.norm()
    return out.cpu()


def run_marked_tests(paths: list[str], timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu -q PATHS`` in a subprocess from the checkout's root -> counts.

    Exit status 5 (nothing collected) is not a failure. Without a ``tests`` folder beside the
    package, or without pytest, the result says so and counts nothing.
    """
    import xml.etree.ElementTree as ET

    import unibct_ray

    root = Path(unibct_ray.__file__).resolve().parents[1]
    if not (root / "tests").is_dir():
        return {"ran": False, "why": f"no tests folder in {root}"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ran": False, "why": "pytest is not installed"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *paths]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"ran": True, "exit_code": None, "ok": False, "why": f"timed out after {timeout_s:g} s"}
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if report.exists():
            for suite in ET.parse(report).getroot().iter("testsuite"):
                for k in counts:
                    counts[k] += int(suite.get(k, 0))
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"ran": True, "command": "pytest -m gpu -q " + " ".join(paths), "exit_code": proc.returncode,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "seconds": round(time.perf_counter() - t, 1), "summary": tail,
            "ok": proc.returncode in (0, 5)}


def _read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _goal(value: float | None, target: float = 0.9) -> dict[str, Any]:
    return {"value": value, "goal": target, "met": None if value is None else value >= target}


def bench_gpu(a: argparse.Namespace, device, sizes: dict[str, Any]) -> dict[str, Any]:
    """Every phase of the check (see the module docstring); ``sizes`` holds the resolved flags."""
    import torch

    from unibct_ray.bench.common import jpeg_shards, machine, use_package_path
    from unibct_ray.bench.refine import class_sizes, synthetic_features
    from unibct_ray.config import from_dict

    on_gpu = device.type == "cuda"
    z = sizes
    out: Path = a.out
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                           "torch": torch.__version__, "sizes": dict(z), "machine": machine()}
    t_all = time.perf_counter()

    # -- data: a few thousand distinct JPEGs repeated (rendering is CPU-bound) --------------
    t = time.perf_counter()
    train_rows = z["train_steps"] * z["batch"]
    train_dir = jpeg_shards(out / "train-shards", train_rows, size=z["size"], distinct=z["distinct"],
                            per_class=max(1, train_rows // z["classes"]), rows_per_shard=z["rows_per_shard"])
    ext_dirs = {n: jpeg_shards(out / f"extract-shards-{n}", n, size=z["size"], distinct=z["distinct"],
                               rows_per_shard=z["rows_per_shard"])
                for n in dict.fromkeys([z["extract_images"], z["extract_small_images"]]) if n > 0}
    res["data_s"] = round(time.perf_counter() - t, 1)

    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(z["cpus_per_worker"])))  # the Ray worker's thread count
    cfg = from_dict({
        "name": f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        "data": {"train": str(train_dir.resolve()), "image_size": z["size"]},
        "model": {"backbone": z["backbone"], "embedding_size": z["embedding_size"]},
        "optim": {"epochs": z["train_epochs"], "base_batch": z["batch"], "lr": 0.1},
        "global_batch": z["batch"], "num_workers": 1, "cpus_per_worker": z["cpus_per_worker"],
        "use_gpu": on_gpu, "amp": True, "seed": 0, "max_failures": 0, "storage": str((out / "runs").resolve()),
        "extract_gpus": z["extract_gpus"], "extract_batch": z["extract_batch"],
    }, "bench gpu")

    # -- 1a. plain training loop (the ceiling) -------------------------------------------------
    classes = (train_rows + max(1, train_rows // z["classes"]) - 1) // max(1, train_rows // z["classes"])
    batches = _decoded_batches(train_dir, z["distinct"], z["batch"], z["size"], device)
    with GpuMemorySampler(on_gpu) as mem:
        plain = plain_train(cfg, classes, batches, z["train_steps"], z["plain_warmup_steps"], device)
    plain["nvidia_smi_peak_mib"] = mem.added_mib()
    del batches
    torch.set_num_threads(threads)

    # -- Ray, started here unless this process is connected already ----------------------------
    use_package_path()
    import ray

    from unibct_ray.distributed.extract import extract_features
    from unibct_ray.distributed.runtime import quiet_ray_data_console
    from unibct_ray.distributed.train import train

    quiet_ray_data_console()
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # More logical CPUs than cores (ARCHITECTURE §8); the GPUs torch sees, said explicitly.
        ray.init(num_cpus=max(4, 2 * cores), num_gpus=torch.cuda.device_count() if on_gpu else None,
                 include_dashboard=False, log_to_driver=False)
    try:
        if on_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            from unibct_ray.errors import UserError

            raise UserError(f"Ray sees no GPU (cluster resources {ray.cluster_resources()}); bench gpu needs one")

        # -- 1b. Ray Train -----------------------------------------------------------------------
        t = time.perf_counter()
        with GpuMemorySampler(on_gpu) as mem:
            result = train(cfg)
        fit_wall = time.perf_counter() - t
        rows = _read_metrics(result.run_dir)
        ips = [r["images_per_s"] for r in rows]
        steady = ips[1:] or ips
        ray_train: dict[str, Any] = {
            "images_per_s_per_epoch": [round(x, 1) for x in ips],
            "images_per_s": round(statistics.median(steady), 1),
            "epoch_s": [round(r["epoch_s"], 2) for r in rows], "fit_wall_s": round(fit_wall, 1),
            "last_loss": round(rows[-1]["loss"], 4), "finite": bool(np.isfinite([r["loss"] for r in rows]).all()),
            "nvidia_smi_peak_mib": mem.added_mib(),
        }
        if rows and "gpu_max_allocated" in rows[-1]:
            ray_train["max_memory_allocated_mib"] = round(max(r["gpu_max_allocated"] for r in rows) / 2**20, 1)
        res["train"] = {"plain": plain, "ray": ray_train,
                        "ratio_ray_over_plain": _ratio(ray_train["images_per_s"], plain["images_per_s"]),
                        "note": "images/s of the epochs after the first (Ray) and after the warm-up steps (plain)"}

        # -- 2. extraction with the trained checkpoint ---------------------------------------------
        from unibct_ray.checkpoint import build_backbone_from_checkpoint

        if on_gpu:
            torch.backends.cudnn.benchmark = True  # as an extraction actor does: one batch shape
        model, _, _ = build_backbone_from_checkpoint(result.checkpoint)
        model = model.to(device, memory_format=torch.channels_last).eval()  # as an actor holds it
        big = z["extract_images"]
        ext_batches = _decoded_batches(ext_dirs[big], z["distinct"], z["extract_batch"], z["size"], device)
        plain_extract(model, ext_batches, z["extract_batch"] * 2, device)  # warm-up: kernels, autotuning
        gpus = z["extract_gpus"] if on_gpu else 0.0
        actors = z["extract_actors"] or (max(1, int(torch.cuda.device_count() / gpus + 1e-6)) if on_gpu else 1)
        ray_res = {"CPU": float(cfg.extract_cpus), **({"GPU": gpus} if gpus else {})}

        plain_s: dict[int, float] = {}
        ray_s: dict[int, float] = {}
        mem_plain: float | None = None
        mem_ray: float | None = None
        plain_feats = ray_feats = None
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        for n in ext_dirs:  # the large set first, then the small one
            with GpuMemorySampler(on_gpu) as mem:
                plain_s[n], f = plain_extract(model, ext_batches, n, device)
            mem_plain = max(filter(None, [mem_plain, mem.added_mib()]), default=None)
            if n == big:
                plain_feats = f
            with GpuMemorySampler(on_gpu) as mem:
                t = time.perf_counter()
                # gpus_per_actor: each actor on a GPU share, embedding under fp16 autocast.
                dst = extract_features(ext_dirs[n], out / f"features-{n}", checkpoint=result.checkpoint,
                                       actors=actors, batch_size=z["extract_batch"], cpus_per_actor=ray_res["CPU"],
                                       overwrite=True, **({"gpus_per_actor": gpus} if gpus else {}))
                ray_s[n] = time.perf_counter() - t
            mem_ray = max(filter(None, [mem_ray, mem.added_mib()]), default=None)
            if n == big:
                ray_feats = _features_by_index(dst, plain_feats.shape[0])
        plain_ex: dict[str, Any] = {"images_per_s": round(big / plain_s[big], 1), "seconds": round(plain_s[big], 2),
                                    "nvidia_smi_peak_mib": mem_plain}
        if on_gpu:
            plain_ex["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        ray_ex: dict[str, Any] = {"images_per_s": round(big / ray_s[big], 1), "seconds": round(ray_s[big], 2),
                                  "actors": actors, "per_actor": ray_res, "nvidia_smi_peak_mib": mem_ray}
        small = z["extract_small_images"]
        if small in ray_s and small != big:
            for who, secs in (("plain", plain_s), ("ray", ray_s)):
                per = (secs[big] - secs[small]) / (big - small)
                part = plain_ex if who == "plain" else ray_ex
                part["steady_images_per_s"] = round(1 / per, 1) if per > 0 else None
                part["fixed_s"] = round(secs[big] - big * per, 2)
        rel = np.linalg.norm(ray_feats - plain_feats, axis=1) / np.maximum(np.linalg.norm(plain_feats, axis=1), 1e-12)
        res["extract"] = {
            "images": big, "small_images": small, "plain": plain_ex, "ray": ray_ex,
            "ratio_ray_over_plain": _ratio(ray_ex["images_per_s"], plain_ex["images_per_s"]),
            "steady_ratio_ray_over_plain": _ratio(ray_ex.get("steady_images_per_s"),
                                                  plain_ex.get("steady_images_per_s")),
            "max_rel_feature_diff": float(rel.max()),
            "same_features": bool(rel.max() < (1e-2 if on_gpu else 1e-4)),
            "decode_images_per_s_one_core": _decode_rate(ext_dirs[big], z["size"]),
            "note": "plain: pre-decoded batches (the GPU's ceiling); ray: whole extract_features calls, JPEG decode "
                    "on each actor's CPU; steady = per-image rate from the two set sizes, fixed_s = the rest",
        }
        del model, ext_batches
        if on_gpu:
            torch.cuda.empty_cache()

        # -- 3. prototype refinement on the device -------------------------------------------------
        from unibct_ray.compat.prototypes import refine_prototypes

        sizes_c = class_sizes(z["refine_classes"])
        old, new, labels = synthetic_features(sizes_c, z["refine_d"])
        where = {"device": device} if on_gpu else {}  # the device argument places the batched solves
        warm = int(np.searchsorted(labels, min(50, z["refine_classes"])))
        refine_prototypes(old[:warm], new[:warm], labels[:warm], min(50, z["refine_classes"]), **where)
        loop_refine_torch(old[:warm], new[:warm], labels[:warm], min(50, z["refine_classes"]), device)
        _sync(device)
        with GpuMemorySampler(on_gpu) as mem:
            t = time.perf_counter()
            protos = refine_prototypes(old, new, labels, z["refine_classes"], **where)
            _sync(device)
            vec_s = time.perf_counter() - t
        t = time.perf_counter()
        ref = loop_refine_torch(old, new, labels, z["refine_classes"], device)
        _sync(device)
        loop_s = time.perf_counter() - t
        n_rows = int(sizes_c.sum())
        res["refine"] = {
            "classes": z["refine_classes"], "rows": n_rows, "d": z["refine_d"], "max_class": int(sizes_c.max()),
            "vectorised": {"rows_per_s": round(n_rows / vec_s, 1), "seconds": round(vec_s, 3),
                           "nvidia_smi_peak_mib": mem.added_mib()},
            "plain_loop": {"rows_per_s": round(n_rows / loop_s, 1), "seconds": round(loop_s, 3)},
            "speedup_vectorised_over_loop": round(loop_s / vec_s, 2),
            "max_abs_diff": float((torch.as_tensor(protos).float().cpu() - ref).abs().max()),
        }
    finally:
        if started:
            ray.shutdown()
    if on_gpu:
        torch.cuda.empty_cache()

    # -- goals -------------------------------------------------------------------------------------
    res["goals"] = {
        "train_ray_over_plain": _goal(res["train"]["ratio_ray_over_plain"]),
        "extract_ray_over_plain_steady": _goal(res["extract"]["steady_ratio_ray_over_plain"]
                                               or res["extract"]["ratio_ray_over_plain"]),
    } if on_gpu else {"note": "CPU smoke run: no goals"}
    res["bench_s"] = round(time.perf_counter() - t_all, 1)

    # -- 4. the tests marked gpu ---------------------------------------------------------------
    res["tests"] = run_marked_tests(a.tests, a.tests_timeout) if a.tests else {"ran": False, "why": "--tests none"}
    res["ok"] = bool(res["extract"]["same_features"] and res["train"]["plain"]["finite"]
                     and res["train"]["ray"]["finite"] and res["tests"].get("ok", True)
                     and res["refine"]["max_abs_diff"] < 1e-3)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    return res


def _features_by_index(path: Path, first: int) -> np.ndarray:
    """Rows with index ``1..first`` of a feature shard set (the distinct images) -> float32 [first, d]."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq  # noqa: F401

    from unibct_ray.data.shards import read_manifest
    from unibct_ray.distributed.data import FEATURE_COLUMN, feature_matrix

    ds = pads.dataset([str(f) for f in read_manifest(path).files], format="parquet")
    table = ds.to_table(columns=["index", FEATURE_COLUMN], filter=pads.field("index") <= first)
    order = np.argsort(table.column("index").to_numpy())
    return feature_matrix(pa.table({FEATURE_COLUMN: table.column(FEATURE_COLUMN)}), FEATURE_COLUMN)[order]


def _decode_rate(shards: Path, size: int, n: int = 512) -> float:
    """Images/s of ``decode_images`` on one core (what bounds an actor that decodes its own batches)."""
    import pyarrow.parquet as pq

    from unibct_ray.data.images import decode_images
    from unibct_ray.data.shards import read_manifest

    images = pq.read_table(read_manifest(shards).files[0], columns=["image"]).column("image").to_pylist()[:n]
    t = time.perf_counter()
    decode_images(images, size)
    return round(len(images) / (time.perf_counter() - t), 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench_out/gpu"), help="working directory (shards are kept)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, run a tiny smoke form on the CPU instead of exiting with status 2")
    sizes = p.add_argument_group("sizes (default: the GPU value; the CPU smoke value in brackets)")
    for key, gpu_value in GPU_SIZES.items():
        flag = "--" + key.replace("_", "-")
        kind = type(gpu_value) if gpu_value is not None else int
        sizes.add_argument(flag, type=kind, default=None, dest=key,
                           help=f"{gpu_value} [{CPU_SMOKE_SIZES[key]}]" + _HELP.get(key, ""))
    p.add_argument("--tests", nargs="*", default=["tests"], metavar="PATH",
                   help="paths for `pytest -m gpu` (no value: skip the tests)")
    p.add_argument("--tests-timeout", type=float, default=300.0, help="seconds for the marked tests")


_HELP = {
    "train_steps": " (steps per epoch: the training set holds train_steps x batch rows)",
    "train_epochs": " (the first is warm-up)",
    "plain_warmup_steps": " (untimed steps of the plain loop)",
    "cpus_per_worker": " (the Ray worker's CPUs and torch threads; the plain loop uses as many)",
    "distinct": " (distinct images, repeated to fill the shard sets)",
    "extract_small_images": " (second extraction size, to separate the fixed cost of a call; 0: none)",
    "extract_gpus": " (GPU share of each extraction actor)",
    "extract_actors": " (default: GPUs / extract_gpus)",
    "refine_classes": " (lognormal class sizes, mean ~55, up to 600)",
}


def resolve_sizes(a: argparse.Namespace, on_gpu: bool) -> dict[str, Any]:
    """The flags given, else the GPU defaults (or the CPU smoke defaults without CUDA)."""
    base = GPU_SIZES if on_gpu else CPU_SMOKE_SIZES
    return {k: (getattr(a, k) if getattr(a, k, None) is not None else v) for k, v in base.items()}


def run(a: argparse.Namespace) -> dict:
    import torch

    from unibct_ray.errors import UserError

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not a.allow_cpu:
        raise UserError("no CUDA device: bench gpu needs one (--allow-cpu runs a tiny smoke form on the CPU)")
    z = resolve_sizes(a, on_gpu)
    for key in ("train_steps", "train_epochs", "batch", "classes", "distinct", "extract_images", "extract_batch",
                "refine_classes", "refine_d", "rows_per_shard"):
        if z[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {z[key]}")
    if not 0 < z["extract_gpus"] <= 0.5:
        raise UserError(f"--extract-gpus must be in (0, 0.5], got {z['extract_gpus']}")
    if z["extract_small_images"] >= z["extract_images"]:
        raise UserError(f"--extract-small-images ({z['extract_small_images']}) must be smaller than "
                        f"--extract-images ({z['extract_images']})")
    if z["distinct"] < z["batch"] or z["distinct"] < z["extract_batch"]:
        raise UserError(f"--distinct ({z['distinct']}) must hold at least one --batch and one --extract-batch")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    return bench_gpu(a, device, z)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("gpu", __doc__, add_arguments, run)
