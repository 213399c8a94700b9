"""``unibct-ray eval``: IJB-C 1:1 and 1:N, self and cross, from checkpoints or features.

From a checkpoint, every IJB-C image is aligned to the model's input size with its 5
landmarks and embedded as ``emb(img) + emb(flipped img)`` on a Ray actor pool (the model is
loaded once per actor, with ``weights_only``). Features are cached in ``OUT/cache/`` under the
checkpoint's content hash, so a rerun, or an evaluation interrupted after one model, does not
recompute them. The metrics are the pure functions of ``unibct_ray.metrics``; 1:N searches go
through FAISS shards on Ray actors.

With ``use_gpu`` the extraction and distractor actors each ask for ``gpus_per_actor`` of a GPU
and embed there under fp16 autocast (``unibct_ray.inference``); the FAISS shard actors ask for
a share too and search on the GPU when faiss has GPU support (flat and ivf; hnsw stays on CPU).

Distractors are appended to each 1:N gallery in the gallery's own embedding space: old-model
distractor embeddings to the galleries of self_old and cross (old galleries), new-model ones
to those of self_new. From checkpoints the distractor faces are rendered once and embedded by
each model in the same pass; from feature files they come from ``--distractor-features`` (old
model) and ``--new-distractor-features`` (new model).

Every input is checked before any work starts (checkpoints load and fit their architecture,
feature files have the right rows, dtype and no NaN/inf, both models share one embedding size,
every image file exists), so a bad input fails in seconds and leaves no output behind. An
image that does not decode is reported by the extraction actors as data, and the driver stops
with one line naming the file. A cached feature file is reused, never replaced, unless
``--overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unibct_ray.data import ijbc
from unibct_ray.errors import DataFormatError, UserError, npy_error

# ray, pyarrow and torch are imported where they are used: an evaluation of feature files
# whose gallery fits one process runs without them (no Ray start, no torch import).

__all__ = ["EvalArgs", "run_eval", "run_matrix", "parse_models", "auto_shards", "flip_protocol", "load_feature_file", "checkpoint_features",
           "checkpoints_features"]

#: Search work (gallery rows x probes x dim, per 1:N search) above which ``auto_shards``
#: spreads each gallery over two Ray actors. Below it, a Ray start and the shard actors cost
#: more than the parallel search saves (``unibct-ray bench search``; see ``auto_shards``).
SHARD_WORK_THRESHOLD = 5e10


@dataclass(frozen=True)
class EvalArgs:
    ijbc: Path
    out: Path
    old_checkpoint: Path | None = None
    old_features: Path | None = None
    new_checkpoint: Path | None = None
    new_features: Path | None = None
    criterion_far: float = 1e-4
    distractors: int = 0
    distractor_features: Path | None = None  # the OLD model's distractor embeddings
    new_distractor_features: Path | None = None  # the NEW model's distractor embeddings
    index: str = "flat"
    shards: int | None = None  # gallery shards on Ray actors; None: ``auto_shards``
    bootstrap: int = 0
    seed: int = 0
    actors: int = 2
    overwrite: bool = False
    cache_dir: Path | None = None  # default OUT/cache; share one between runs on the same IJB-C folder
    use_gpu: bool = False  # extraction / distractor actors and FAISS shards on GPU shares
    gpus_per_actor: float = 0.5  # GPU share of each extraction actor and FAISS shard (use_gpu)
    batch_size: int = 64  # images per forward pass of an extraction actor


def load_feature_file(path: Path, n_images: int | None, what: str, *, min_rows: int = 0) -> np.ndarray:
    """A ``.npy`` of per-image features (float32/float16, rows in 5pts-file order) -> float32.

    ``n_images``: the exact row count required (None: any, but at least ``min_rows``). Never
    unpickles (``allow_pickle=False``): an object array is refused, not loaded.
    """
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} file not found")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise npy_error(path, e) from None
    if arr.dtype not in (np.float32, np.float16):
        raise DataFormatError(f"{path}: {what} must be float32 or float16, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DataFormatError(f"{path}: {what} must be 2-D [images, dim], got shape {arr.shape}")
    if n_images is not None and arr.shape[0] != n_images:
        raise DataFormatError(f"{path}: {arr.shape[0]} rows, but the IJB-C meta lists {n_images} images "
                              "(rows must follow ijbc_name_5pts_score.txt)")
    if arr.shape[0] < min_rows:
        raise DataFormatError(f"{path}: {what} has {arr.shape[0]} rows, at least {min_rows} are needed")
    out = np.asarray(arr, np.float32)  # float32: the mapped file itself, read on first touch
    step = max(1, (1 << 22) // max(1, out.shape[1]))  # 4 MiB of flags at a time, not one per element
    for lo in range(0, out.shape[0], step):
        bad = ~np.isfinite(out[lo:lo + step]).all(axis=1)
        if bad.any():
            raise DataFormatError(f"{path}: {what} row {lo + int(np.flatnonzero(bad)[0])} holds NaN/inf")
    return out


class _AlignEmbed:
    """Actor-pool UDF: read, align (5 points), embed image + mirror with each model, sum.

    Several models share one pass (each image is read and aligned once per input size, and
    copied to the device once); model k's features come back in column ``feature_k``.
    ``use_gpu``: the actor was given a GPU share (fp16 autocast there; float32 on one CPU
    thread otherwise, see ``unibct_ray.inference``).
    """

    def __init__(self, checkpoints: list[str], use_gpu: bool = False):
        from unibct_ray.checkpoint import build_backbone_from_checkpoint
        from unibct_ray.inference import DeviceEmbedder

        models, self.sizes = [], []
        for c in checkpoints:
            model, cfg, _ = build_backbone_from_checkpoint(c)
            models.append(model)
            self.sizes.append(cfg.data.image_size)
        self.embedder = DeviceEmbedder(models, use_gpu=use_gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from unibct_ray.data.images import to_tensor_layout
        from unibct_ray.data.landmarks import align_face

        images, errors = [], []
        for path in batch["path"]:
            try:
                with Image.open(str(path)) as im:
                    images.append(np.asarray(im.convert("RGB")))
                errors.append("")
            except (OSError, ValueError, SyntaxError) as e:
                # Returned as data, not raised: the driver stops with one line naming the file
                # (an exception here would surface as Ray Data's multi-line remote traceback).
                images.append(np.zeros((max(self.sizes), max(self.sizes), 3), np.uint8))
                errors.append(f"{path}: image does not decode ({str(e).splitlines()[0][:160]})")
        out = {"row": batch["row"], "error": np.asarray(errors, dtype=object)}
        crops: dict[int, object] = {}  # input size -> [b, 3, s, s] on the device
        for k, size in enumerate(self.sizes):
            if size not in crops:
                crops[size] = self.embedder.to_device(to_tensor_layout(np.stack([
                    align_face(img, np.asarray(lm, np.float32).reshape(5, 2), size)
                    for img, lm in zip(images, batch["landmarks"])])))
            out[f"feature_{k}"] = self.embedder.embed(crops[size], model=k, flip_sum=True)
        return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:20]


def check_checkpoint(path: Path) -> int:
    """Load ``path`` safely and build its backbone in this process -> its embedding size.

    Refuses hostile or foreign files and weights that do not fit the stored architecture
    before any actor starts.
    """
    from unibct_ray.checkpoint import build_backbone_from_checkpoint

    _, cfg, _ = build_backbone_from_checkpoint(path)
    return int(cfg.model.embedding_size)


def check_images(meta: ijbc.IJBCMeta) -> None:
    """Every image the meta lists exists under ``loose_crop`` (one directory listing)."""
    img_dir = meta.root / "loose_crop"
    if not img_dir.is_dir():
        raise DataFormatError(f"{img_dir}: IJB-C image directory not found")
    present = set(os.listdir(img_dir))
    for name in meta.image_names:
        if name not in present and not (img_dir / name).is_file():
            raise DataFormatError(f"{img_dir / name}: image listed in ijbc_name_5pts_score.txt is missing")


def _cached(cache: Path, n_images: int, overwrite: bool) -> np.ndarray | None:
    """A cached feature file, or None when there is none (or ``overwrite`` discards it)."""
    if not cache.exists() or overwrite:
        return None
    try:
        arr = np.load(cache, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(f"{cache}: unreadable feature cache ({str(e).splitlines()[0]}); "
                              "pass --overwrite to recompute it") from None
    if arr.ndim != 2 or arr.shape[0] != n_images or not np.isfinite(arr).all():
        raise DataFormatError(f"{cache}: cached features of shape {arr.shape} do not fit these {n_images} "
                              "IJB-C images; pass --overwrite to recompute them")
    return arr


def _cache_path(meta: ijbc.IJBCMeta, checkpoint: Path, cache_dir: Path) -> tuple[Path, str]:
    key = _file_hash(checkpoint)
    # The folder's fingerprint too: a cache shared between IJB-C folders must not mix them up.
    h = hashlib.sha256("\n".join(meta.image_names).encode())
    h.update(np.ascontiguousarray(meta.landmarks, np.float32).tobytes())
    key = f"{key}-{h.hexdigest()[:12]}"
    return cache_dir / f"features-{key}.npy", key


def checkpoint_features(meta: ijbc.IJBCMeta, checkpoint: Path, cache_dir: Path, actors: int,
                        overwrite: bool = False, **device: Any) -> np.ndarray:
    """Per-image ``emb + emb_flip`` [n, d] of a checkpoint over the IJB-C images (cached).

    The cache file is keyed by the checkpoint's and the folder's content and written
    atomically; an existing one is reused, never replaced, unless ``overwrite``.
    ``device``: the keyword arguments ``gpus_per_actor``, ``batch_size`` and ``log`` of
    :func:`checkpoints_features`.
    """
    return checkpoints_features(meta, [checkpoint], cache_dir, actors, overwrite, **device)[0]


def _pool_args(actors: int, gpus_per_actor: float) -> dict:
    """``map_batches`` arguments of an embedding actor pool: one CPU each, and a GPU share
    when ``gpus_per_actor`` > 0 (the actor then embeds on that GPU)."""
    import ray

    out = {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": 1}
    if gpus_per_actor > 0:
        out["num_gpus"] = gpus_per_actor
    return out


def checkpoints_features(meta: ijbc.IJBCMeta, checkpoints: list[Path], cache_dir: Path, actors: int,
                         overwrite: bool = False, *, gpus_per_actor: float = 0.0,
                         batch_size: int = 64, log: Callable[[str], None] | None = None) -> list[np.ndarray]:
    """``checkpoint_features`` of several checkpoints with one actor pool and one pass.

    The checkpoints not yet cached are embedded together: each actor loads all of them once,
    and each image is read and aligned once. Each gets its own cache file.
    ``gpus_per_actor`` > 0: each actor asks for that GPU share and embeds on it (fp16
    autocast; features equal the CPU ones to fp16 precision, cosine > 0.999).
    ``batch_size``: images per forward pass. ``log`` gets a line when the pass starts, one
    every ~10 s while it runs (images done) and one when it ends.
    """
    import pyarrow as pa
    import ray

    from unibct_ray.checkpoint import load_checkpoint
    from unibct_ray.data.shards import atomic_write_text

    for c in checkpoints:
        load_checkpoint(c)  # refuse hostile/foreign files before any actor starts
    caches = [_cache_path(meta, Path(c), cache_dir) for c in checkpoints]
    result: list[np.ndarray | None] = [_cached(cache, len(meta.image_names), overwrite) for cache, _ in caches]
    # Each missing cache file once (the same checkpoint given twice is embedded once).
    todo = {caches[k]: str(checkpoints[k]) for k, r in enumerate(result) if r is None}
    say = log or (lambda _msg: None)

    def models(k: int) -> str:
        return f"{k} checkpoint{'s' if k != 1 else ''}"

    if not todo:
        say(f"features of {models(len(checkpoints))}: from the cache ({cache_dir})")
        return result
    ckpts = list(todo.values())
    check_images(meta)
    img_dir = meta.root / "loose_crop"
    rows = np.arange(len(meta.image_names))
    table = pa.table({
        "row": rows,
        "path": [str(img_dir / n) for n in meta.image_names],
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(meta.landmarks.reshape(-1), pa.float32()), 10),
    })
    blocks = max(1, min(len(rows) // 256, 4 * actors))
    actors = min(actors, blocks)  # an actor without a block of its own would only start and wait
    ds = ray.data.from_arrow(table).repartition(blocks).map_batches(
        _AlignEmbed, fn_constructor_kwargs={"checkpoints": ckpts, "use_gpu": gpus_per_actor > 0},
        batch_size=batch_size, batch_format="numpy", **_pool_args(actors, gpus_per_actor),
    )
    feats: list[np.ndarray | None] = [None] * len(ckpts)
    done = np.zeros(len(rows), bool)
    say(f"embedding {len(rows)} images with {models(len(ckpts))} (aligned, emb + flip; one pass) on "
        f"{actors} actor{'s' if actors != 1 else ''} ({f'GPU {gpus_per_actor:g} each' if gpus_per_actor else 'CPU'})"
        + (f"; {models(len(checkpoints) - len(ckpts))} from the cache" if len(ckpts) < len(checkpoints) else ""))
    t0 = last = time.perf_counter()
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        bad = [e for e in batch["error"].tolist() if e]
        if bad:
            raise DataFormatError(bad[0])
        for j in range(len(ckpts)):
            f = batch[f"feature_{j}"]
            if feats[j] is None:
                feats[j] = np.zeros((len(rows), f.shape[1]), np.float32)
            feats[j][batch["row"]] = f
        done[batch["row"]] = True
        if time.perf_counter() - last >= 10.0 and not done.all():
            last = time.perf_counter()
            say(f"embedded {int(done.sum())}/{len(rows)} images ({last - t0:.0f} s)")
    dt = time.perf_counter() - t0
    say(f"embedded {int(done.sum())} images in {dt:.1f} s ({done.sum() / max(dt, 1e-9):.0f} img/s)")
    if not done.all():
        raise RuntimeError(f"feature extraction of {', '.join(ckpts)} returned {int(done.sum())} of {len(rows)} images")
    for ckpt, arr in zip(ckpts, feats):
        if not np.isfinite(arr).all():
            bad_img = meta.image_names[int(np.flatnonzero(~np.isfinite(arr).all(1))[0])]
            raise DataFormatError(f"{ckpt}: the model gives NaN/inf features (first for image {bad_img})")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for ((path, key), ckpt), arr in zip(todo.items(), feats):
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
        atomic_write_text(path.with_suffix(".json"), json.dumps({"checkpoint": ckpt, "sha256_20": key,
                                                                 "rows": len(rows)}) + "\n")
    by_cache = dict(zip(todo, feats))
    return [r if r is not None else by_cache[caches[k]] for k, r in enumerate(result)]


def _normalised(arr: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1)


def _distractor_sources(a: EvalArgs, sides: list[str]) -> dict[str, tuple[str, Path]]:
    """Where each gallery model's distractor embeddings come from -> {side: ("file"|"checkpoint", path)}.

    ``sides``: the models whose galleries are searched ("old" for self_old and cross, "new"
    for self_new). Raises ``UserError`` (before any work) naming the missing flag.
    """
    out: dict[str, tuple[str, Path]] = {}
    for side in sides:
        flag, feats = (("--distractor-features", a.distractor_features) if side == "old"
                       else ("--new-distractor-features", a.new_distractor_features))
        ckpt = a.old_checkpoint if side == "old" else a.new_checkpoint
        if feats:
            out[side] = ("file", feats)
        elif ckpt:
            out[side] = ("checkpoint", ckpt)
        else:
            test = "self_old and cross" if side == "old" else "self_new"
            raise UserError(f"--distractors {a.distractors}: the {test} galleries need {side}-model embeddings of "
                            f"the distractor faces: give {flag} F.npy (or --{side}-checkpoint to render and "
                            "embed synthetic faces)")
    return out


def _distractor_features(a: EvalArgs, cache_dir: Path, sides: list[str]) -> dict[str, np.ndarray]:
    """L2-normalised distractor embeddings [n_d, d] per gallery model ("old", "new").

    Each model's distractors are embedded by that model: feature files as given, and for
    checkpoints the same synthetic faces rendered once and embedded by every model needing
    them in one pass.
    """
    if a.distractors <= 0:
        return {}
    src = _distractor_sources(a, sides)
    out: dict[str, np.ndarray] = {}
    for side, (kind, path) in src.items():
        if kind == "file":
            flag = "distractor features" if side == "old" else "new-model distractor features"
            out[side] = load_feature_file(path, None, flag, min_rows=a.distractors)[: a.distractors]
    to_render = [(side, path) for side, (kind, path) in src.items() if kind == "checkpoint"]
    if to_render:
        rendered = _render_distractors([p for _, p in to_render], a.distractors, a.seed, cache_dir, a.actors,
                                       gpus_per_actor=a.gpus_per_actor if a.use_gpu else 0.0,
                                       batch_size=a.batch_size)
        out.update({side: arr for (side, _), arr in zip(to_render, rendered)})
    return {side: _normalised(arr) for side, arr in out.items()}


class _RenderEmbed:
    """Actor-pool UDF: render synthetic faces (identities never used elsewhere) and embed them
    with each model; model k's embeddings (``emb + emb_flip``) in column ``feature_k``.

    One rendering serves every model: each gallery gets the same faces, embedded in its own space.
    """

    def __init__(self, checkpoints: list[str], seed: int, use_gpu: bool = False):
        from unibct_ray.checkpoint import build_backbone_from_checkpoint
        from unibct_ray.inference import DeviceEmbedder

        models, self.sizes = [], []
        for c in checkpoints:
            model, cfg, _ = build_backbone_from_checkpoint(c)
            models.append(model)
            self.sizes.append(cfg.data.image_size)
        self.embedder = DeviceEmbedder(models, use_gpu=use_gpu)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from unibct_ray.data.faces import render_aligned, sample_identity
        from unibct_ray.data.images import to_tensor_layout

        out = {"id": batch["id"]}
        crops: dict[int, object] = {}
        for k, size in enumerate(self.sizes):
            if size not in crops:
                imgs = []
                for i in batch["id"].tolist():
                    ident = sample_identity(self.seed, 2_000_000_000 + i)  # far from training/eval ids
                    imgs.append(render_aligned(ident, np.random.default_rng([self.seed, 99, i]), size))
                crops[size] = self.embedder.to_device(to_tensor_layout(np.stack(imgs)))
            out[f"feature_{k}"] = self.embedder.embed(crops[size], model=k, flip_sum=True)
        return out


def _render_distractors(checkpoints: list[Path], n: int, seed: int, cache_dir: Path, actors: int, *,
                        gpus_per_actor: float = 0.0, batch_size: int = 64) -> list[np.ndarray]:
    """``n`` synthetic distractor faces embedded by each checkpoint -> [n, d] per checkpoint.

    Cached per checkpoint (content hash), seed and count; the checkpoints without a cache
    file are embedded together in one pass over one rendering.
    """
    import ray

    caches = [cache_dir / f"distractors-{_file_hash(Path(c))}-{seed}-{n}.npy" for c in checkpoints]
    result: list[np.ndarray | None] = [np.load(c, allow_pickle=False) if c.exists() else None for c in caches]
    todo = list(dict.fromkeys(str(checkpoints[k]) for k, r in enumerate(result) if r is None))
    if not todo:
        return result
    ds = ray.data.range(n).map_batches(
        _RenderEmbed, fn_constructor_kwargs={"checkpoints": todo, "seed": seed, "use_gpu": gpus_per_actor > 0},
        batch_size=batch_size, batch_format="numpy", **_pool_args(actors, gpus_per_actor))
    feats: list[np.ndarray | None] = [None] * len(todo)
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for j in range(len(todo)):
            f = b[f"feature_{j}"]
            if feats[j] is None:
                feats[j] = np.zeros((n, f.shape[1]), np.float32)
            feats[j][b["id"]] = f
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = dict(zip(todo, feats))
    for k, c in enumerate(caches):
        if result[k] is None:
            result[k] = done[str(checkpoints[k])]
            tmp = c.with_name(f".{c.name}.tmp.npy")
            np.save(tmp, result[k])
            os.replace(tmp, c)
    return result


#: How each kind of model input became the per-image features the metrics read.
_FLIP_BY_SOURCE = {
    "checkpoint": "emb(img) + emb(flipped img), embedded here from the checkpoint (5-point aligned crops)",
    "features": "precomputed per-image features (taken as emb + emb(flipped))",
}


def flip_protocol(sources: dict[str, str]) -> str:
    """The report's ``protocol.flip`` line: ``sources`` {"old"/"new": "checkpoint" | "features"}
    says where each model's features came from (``per_model_text`` joins them)."""
    from unibct_ray.metrics.evaluate import per_model_text

    return per_model_text({side: _FLIP_BY_SOURCE[kind] for side, kind in sources.items()})


def _metric_times(secs: dict[str, float]) -> str:
    """One line of ``evaluate_features``'s stage times."""
    one = sum(v for k, v in secs.items() if k.endswith(("/scores", "/verification")))
    many = sum(v for k, v in secs.items() if k.endswith("/identification"))
    parts = [f"1:1 {one:.1f} s", f"1:N {many:.1f} s"] + ([f"bootstrap {secs['bootstrap']:.1f} s"]
                                                         if "bootstrap" in secs else [])
    return f"metrics in {secs.get('total', 0.0):.1f} s ({', '.join(parts)})"


def auto_shards(gallery_rows: int, probes: int, dim: int) -> int:
    """Gallery shards for a 1:N search of ``probes`` queries over ``gallery_rows`` rows of ``dim``.

    2 (Ray actors) when the search work ``gallery_rows * probes * dim`` exceeds
    :data:`SHARD_WORK_THRESHOLD`, else 1 (in process, no Ray). Measured on 2 cores with
    ``unibct-ray bench search --gallery 20000 --queries 19593 --dim 512`` (work 2e11): one
    two-thread index 26.4 s, two one-thread shard actors 20.3 s including their start, so
    ~6 s saved per search, ~36 s over the evaluation's six searches, against ~5-8 s for
    starting Ray. Time scales with the work, so the break-even is near 4e10; the threshold
    sits a little above it. For IJB-C (19,593 probes x 512-d) that is ~5k gallery rows: the
    real galleries (~1.8k templates) stay in process, galleries with thousands of
    distractors go to Ray.
    """
    return 2 if float(gallery_rows) * probes * dim > SHARD_WORK_THRESHOLD else 1


def _knn_backend(a: EvalArgs, shards: int, gpus: float) -> tuple[Any, contextlib.AbstractContextManager, Any]:
    """(1:N backend, a context that keeps its actors up, the recall probe or None).

    ``shards`` > 1: FAISS shards on Ray actors (they stay up for every search of the
    evaluation). One shard: an exact (``flat``) search on the CPU is ``brute_force_knn``, which
    lets ``evaluate_features`` take each 1:N test's scores from the score grid its 1:1 test
    already computed (the same exact top-k as a FAISS flat index, without the second set of
    products: the CLI measured 2x the CPU time of the in-process report with FAISS here); an
    approximate or GPU index is one in-process FAISS index. An approximate index is wrapped in
    a probe that measures its recall against exact search.
    """
    from unibct_ray.metrics.distractors import RecallKNN
    from unibct_ray.metrics.knn import FaissKNN, brute_force_knn

    if shards <= 1 and a.index == "flat" and not gpus and not a.use_gpu:
        return brute_force_knn, contextlib.nullcontext(), None
    if shards > 1:
        from unibct_ray.distributed.knn import RayShardedKNN

        base: Any = RayShardedKNN(shards=shards, index=a.index, gpus_per_shard=gpus)
        keep_up: contextlib.AbstractContextManager = base
    else:
        base = FaissKNN(index=a.index, use_gpu=a.use_gpu)
        keep_up = contextlib.nullcontext()
    return base, keep_up, RecallKNN(base) if a.index != "flat" else None


def _check_common(a: EvalArgs, report_name: str) -> None:
    """The flags every evaluation checks before reading anything."""
    if (a.out / report_name).exists() and not a.overwrite:
        raise UserError(f"{a.out}/{report_name}: already exists (pass --overwrite to replace it)")
    if a.index not in ("flat", "ivf", "hnsw"):
        raise UserError(f"--index must be flat, ivf or hnsw, got {a.index!r}")
    if not 0 < a.gpus_per_actor <= 1:
        raise UserError(f"--gpus-per-actor must be in (0, 1], got {a.gpus_per_actor}")
    if a.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.shards is not None and a.shards < 1:
        raise UserError(f"--shards must be >= 1, got {a.shards}")


def _read_meta(a: EvalArgs, say: Callable[[str], None]) -> tuple[Path, ijbc.IJBCMeta, Callable[[], None] | None]:
    """(cache dir, the IJB-C meta, its cache writer or None when it came from the cache), with
    the phase's line."""
    cache = a.cache_dir if a.cache_dir is not None else a.out / "cache"
    t = time.perf_counter()
    meta, save_meta_cache = ijbc.read_ijbc_meta_cached(a.ijbc, cache)
    say(f"IJB-C {meta.root}: {len(meta.image_names)} images, {len(np.unique(meta.templates))} templates, "
        f"{len(meta.pair_labels)} 1:1 pairs, 1:N galleries G1 {len(meta.gallery1)} / G2 {len(meta.gallery2)} and "
        f"{len(meta.probes)} probe templates (meta {'parsed' if save_meta_cache else 'from the cache'} in "
        f"{time.perf_counter() - t:.1f} s)")
    return cache, meta, save_meta_cache


def run_eval(a: EvalArgs, connect: Callable[[], None] | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Evaluate and write ``OUT/report.json``, ``report.md``, ``roc.png``, ``cmc.png``.

    ``connect`` (e.g. the CLI's ``ensure_ray``) is called after every input is checked, and only
    when Ray is needed (a checkpoint to embed, or more than one gallery shard). Without Ray
    nothing here imports ray or torch. The parsed IJB-C meta is cached in the cache directory
    (``ijbc.read_ijbc_meta_cached``), written only once the evaluation has succeeded, so a
    run stopped by a bad input leaves nothing behind.

    ``log`` (the CLI prints it) gets a line per phase, with counts and times: the IJB-C meta,
    Ray's start, feature extraction, distractors, the metrics.
    """
    from unibct_ray.metrics.distractors import DistractorKNN
    from unibct_ray.metrics.evaluate import evaluate_features
    from unibct_ray.metrics.report import write_report

    if a.old_checkpoint and a.old_features or a.new_checkpoint and a.new_features:
        raise UserError("give a checkpoint or a feature file per model, not both")
    if not any([a.old_checkpoint, a.old_features, a.new_checkpoint, a.new_features]):
        raise UserError("nothing to evaluate: give --old-checkpoint/--old-features and/or --new-checkpoint/--new-features")
    _check_common(a, "report.json")
    say = log or (lambda _msg: None)
    cache, meta, save_meta_cache = _read_meta(a, say)
    n = len(meta.image_names)

    # Check every input before any work: a bad one fails fast and leaves nothing under OUT.
    loaded: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[Path, int]] = {}
    for what, ckpt, feats in (("old", a.old_checkpoint, a.old_features), ("new", a.new_checkpoint, a.new_features)):
        if feats:
            loaded[what] = load_feature_file(feats, n, f"{what} features")
            dims[what] = (feats, loaded[what].shape[1])
        elif ckpt:
            dims[what] = (ckpt, check_checkpoint(ckpt))
    if len(dims) == 2 and dims["old"][1] != dims["new"][1]:
        (src_o, d_o), (src_n, d_n) = dims["old"], dims["new"]
        raise DataFormatError(f"{src_n}: embedding size {d_n} differs from {src_o} ({d_o}); "
                              "a cross-model test needs one embedding space")
    # The models whose galleries are searched: old for self_old and cross, new for self_new.
    sides = [s for s in ("old", "new") if s in dims]
    if a.distractors > 0:
        for side, (kind, path) in _distractor_sources(a, sides).items():
            if kind != "file":
                continue
            flag = "distractor features" if side == "old" else "new-model distractor features"
            dist = load_feature_file(path, None, flag, min_rows=a.distractors)
            if dist.shape[1] != dims[side][1]:
                raise DataFormatError(f"{path}: dimension {dist.shape[1]} differs from the {side} "
                                      f"model's {dims[side][1]} ({dims[side][0]})")
            del dist

    dim = next(iter(dims.values()))[1]
    gallery_rows = max(len(meta.gallery1), len(meta.gallery2)) + max(a.distractors, 0)
    shards = a.shards if a.shards is not None else auto_shards(gallery_rows, len(meta.probes), dim)
    if connect is not None and (a.old_checkpoint or a.new_checkpoint or shards > 1):
        t = time.perf_counter()
        connect()
        say(f"Ray ready in {time.perf_counter() - t:.1f} s")
    gpus = a.gpus_per_actor if a.use_gpu else 0.0

    # Both checkpoints (when both sides are models) in one extraction pass.
    embed = {w: c for w, c in (("old", a.old_checkpoint), ("new", a.new_checkpoint)) if c and w not in loaded}
    if embed:
        loaded.update(zip(embed, checkpoints_features(meta, list(embed.values()), cache, a.actors,
                                                      overwrite=a.overwrite, gpus_per_actor=gpus,
                                                      batch_size=a.batch_size, log=say)))
    old, new = loaded.get("old"), loaded.get("new")
    base, keep_up, recall = _knn_backend(a, shards, gpus)
    knn = recall or base
    t = time.perf_counter()
    if a.distractors > 0:
        say(f"distractors: {a.distractors} faces for the {' and '.join(sides)} model galleries (rendered and "
            "embedded by each checkpoint, or read from the feature files)")
    distractors = _distractor_features(a, cache, sides)
    if distractors:
        say(f"distractors ready in {time.perf_counter() - t:.1f} s")
    if distractors:
        # Each gallery searched with the distractors of its own model (evaluate_features picks
        # the backend by the model on the gallery side of each test).
        knn = {side: DistractorKNN(knn, distractors[side], embedded_by=f"the {side} model") for side in sides}
    tests = [t for t, need in (("self_old", ["old"]), ("self_new", ["new"]), ("cross", ["old", "new"]))
             if all(s in sides for s in need)]
    say(f"scoring {', '.join(tests)}: 1:1 over {len(meta.pair_labels)} pairs, 1:N of {len(meta.probes)} probes "
        f"({shards} shard{'s' if shards != 1 else ''}, {a.index})"
        + (f", {a.bootstrap} bootstrap resamples" if a.bootstrap else ""))
    with keep_up:
        report, curves = evaluate_features(meta, old, new, knn=knn, criterion_far=a.criterion_far,
                                           bootstrap=a.bootstrap, seed=a.seed)
    say(_metric_times(curves.seconds))
    if distractors:
        report.setdefault("protocol", {})["distractor_embeddings"] = {
            test: f"{side} model ({_distractor_sources(a, [side])[side][1]})"
            for test, side in (("self_old", "old"), ("cross", "old"), ("self_new", "new")) if side in distractors
            and (test != "cross" or len(sides) == 2)}
    report.setdefault("protocol", {}).update({
        "flip": flip_protocol({s: "checkpoint" if s in embed else "features" for s in sides}),
        "ijbc": str(meta.root), "index": a.index, "shards": shards, "distractors": a.distractors,
        "inference_device": f"GPU ({gpus:g} per actor, fp16 autocast)" if gpus else "CPU (float32)",
        "old": str(a.old_checkpoint or a.old_features or ""), "new": str(a.new_checkpoint or a.new_features or ""),
        "pixel_normalisation": "(x - 127.5) / 127.5", "alignment": "5-point similarity to the ArcFace template",
    })
    if recall is not None:
        report["knn_recall_at_k"] = {"k": "the 1:N search depth", "mean": float(np.mean(recall.recalls)) if recall.recalls else None,
                                     "per_search": [float(r) for r in recall.recalls]}
    if save_meta_cache is not None:
        # Only now: a run stopped by a bad input (a missing image is found during extraction)
        # leaves nothing behind.
        save_meta_cache()
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(report, a.out, curves.roc, curves.cmc)
    return report


#: A model's name in ``--models NAME=PATH``: it names folders and table rows.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def parse_models(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` items, oldest model first -> [(name, path)]; a ``.npy`` path is a feature
    file, anything else a checkpoint. A bare PATH is named after its file (``final`` of
    ``runs/x/final.pt`` is taken from the run folder instead, ``x``)."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            p = Path(spec)
            name, path = (p.parent.name if p.stem == "final" else p.stem), spec
        if not _MODEL_NAME.fullmatch(name):
            raise UserError(f"--models {spec!r}: a model name is 1-64 letters, digits or ._+- (it names a folder)")
        if not path:
            raise UserError(f"--models {spec!r}: no path after '='")
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--models: the name(s) {', '.join(dup)} are given twice; name each model (NAME=PATH)")
    return out


def run_matrix(a: EvalArgs, models: list[tuple[str, Path]], pairs: str = "all",
               connect: Callable[[], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """``unibct-ray eval --models``: the compatibility matrix of any number of models.

    ``models`` (oldest first) are checkpoints or ``.npy`` feature files; every checkpoint not
    yet cached is embedded in one extraction pass (one actor pool, each image read and aligned
    once), then each requested (query, gallery) pair is scored
    (:func:`unibct_ray.metrics.matrix.evaluate_matrix`). Writes ``OUT/matrix.{md,png,json}``
    and each pair's full report under ``OUT/pairs/<query>-vs-<gallery>/``. Every input is
    checked first, as in :func:`run_eval`.
    """
    from unibct_ray.metrics.matrix import PAIR_RULES, evaluate_matrix, write_matrix

    _check_common(a, "matrix.json")
    if not models:
        raise UserError("--models: give at least one NAME=PATH")
    if pairs not in PAIR_RULES:
        raise UserError(f"--pairs must be one of {', '.join(PAIR_RULES)}, got {pairs!r}")
    if a.distractors:
        raise UserError("--distractors works with --old-*/--new-* (one pair); a --models matrix has none")
    if any([a.old_checkpoint, a.old_features, a.new_checkpoint, a.new_features]):
        raise UserError("give --models or --old-*/--new-*, not both")
    say = log or (lambda _msg: None)
    cache, meta, save_meta_cache = _read_meta(a, say)
    n = len(meta.image_names)
    feats: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[Path, int]] = {}
    ckpts: dict[str, Path] = {}
    for name, path in models:
        if not path.is_file():
            raise UserError(f"{path}: model {name!r} not found")
        if path.suffix == ".npy":
            feats[name] = load_feature_file(path, n, f"features of {name}")
            dims[name] = (path, feats[name].shape[1])
        else:
            ckpts[name] = path
            dims[name] = (path, check_checkpoint(path))
    (first, (src0, d0)), *rest = dims.items()
    for name, (src, d) in rest:
        if d != d0:
            raise DataFormatError(f"{src}: embedding size {d} of {name!r} differs from {first!r}'s {d0} ({src0}); "
                                  "cross-model tests need one embedding space")
    shards = a.shards if a.shards is not None else auto_shards(max(len(meta.gallery1), len(meta.gallery2)),
                                                               len(meta.probes), d0)
    if connect is not None and (ckpts or shards > 1):
        t = time.perf_counter()
        connect()
        say(f"Ray ready in {time.perf_counter() - t:.1f} s")
    gpus = a.gpus_per_actor if a.use_gpu else 0.0
    if ckpts:
        say(f"embedding with {len(ckpts)} checkpoint(s) in one pass: {', '.join(ckpts)}")
        feats.update(zip(ckpts, checkpoints_features(meta, list(ckpts.values()), cache, a.actors,
                                                     overwrite=a.overwrite, gpus_per_actor=gpus,
                                                     batch_size=a.batch_size, log=say)))
    order = [name for name, _ in models]
    base, keep_up, recall = _knn_backend(a, shards, gpus)
    t = time.perf_counter()
    with keep_up:
        matrix, runs = evaluate_matrix(meta, feats, order, pairs=pairs, knn=recall or base,
                                       criterion_far=a.criterion_far, bootstrap=a.bootstrap, seed=a.seed)
    say(f"scored {len(matrix['cells'])} pair(s) and {len(order)} self test(s) in {time.perf_counter() - t:.1f} s")
    matrix["sources"] = {name: str(path) for name, path in models}
    matrix["protocol"] = {"ijbc": str(meta.root), "index": a.index, "shards": shards,
                          "inference_device": f"GPU ({gpus:g} per actor, fp16 autocast)" if gpus else "CPU (float32)",
                          "flip": flip_protocol({m: "checkpoint" if m in ckpts else "features" for m in order})}
    if save_meta_cache is not None:
        save_meta_cache()
    write_matrix(matrix, a.out, runs, title="Compatibility matrix: " + " -> ".join(order))
    return matrix
