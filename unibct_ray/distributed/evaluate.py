"""``unibct-ray eval``: IJB-C 1:1 and 1:N, self and cross, from checkpoints or features.

From a checkpoint, every IJB-C image is aligned to the model's input size with its 5
landmarks and embedded as ``emb(img) + emb(flipped img)`` on a Ray actor pool (the model is
loaded once per actor, with ``weights_only``). Features are cached in ``OUT/cache/`` under the
checkpoint's content hash, so a rerun, or an evaluation interrupted after one model, does not
recompute them. The metrics are the pure functions of ``unibct_ray.metrics``; 1:N searches go
through FAISS shards on Ray actors.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import ray

from unibct_ray.data import ijbc
from unibct_ray.data.images import to_tensor_layout
from unibct_ray.data.shards import atomic_write_text
from unibct_ray.errors import DataFormatError, UserError, npy_error

__all__ = ["EvalArgs", "run_eval", "load_feature_file", "checkpoint_features", "checkpoints_features"]


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
    distractor_features: Path | None = None
    index: str = "flat"
    shards: int = 2
    bootstrap: int = 0
    seed: int = 0
    actors: int = 2
    overwrite: bool = False
    cache_dir: Path | None = None  # default OUT/cache; share one between runs on the same IJB-C folder


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
    out = np.asarray(arr, np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataFormatError(f"{path}: {what} row {int(np.flatnonzero(bad)[0])} holds NaN/inf")
    return out


class _AlignEmbed:
    """Actor-pool UDF: read, align (5 points), embed image + mirror with each model, sum.

    Several models share one pass (each image is read and aligned once per input size);
    model k's features come back in column ``feature_k``.
    """

    def __init__(self, checkpoints: list[str]):
        import torch

        from unibct_ray.checkpoint import build_backbone_from_checkpoint

        torch.set_num_threads(1)
        self.models, self.sizes = [], []
        for c in checkpoints:
            model, cfg, _ = build_backbone_from_checkpoint(c)
            self.models.append(model)
            self.sizes.append(cfg.data.image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

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
        crops: dict[int, torch.Tensor] = {}
        for k, (model, size) in enumerate(zip(self.models, self.sizes)):
            if size not in crops:
                crops[size] = torch.from_numpy(to_tensor_layout(np.stack([
                    align_face(img, np.asarray(lm, np.float32).reshape(5, 2), size)
                    for img, lm in zip(images, batch["landmarks"])])))
            x = crops[size]
            with torch.inference_mode():
                out[f"feature_{k}"] = (model(x) + model(torch.flip(x, dims=[3]))).float().numpy()
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
                        overwrite: bool = False) -> np.ndarray:
    """Per-image ``emb + emb_flip`` [n, d] of a checkpoint over the IJB-C images (cached).

    The cache file is keyed by the checkpoint's and the folder's content and written
    atomically; an existing one is reused, never replaced, unless ``overwrite``.
    """
    return checkpoints_features(meta, [checkpoint], cache_dir, actors, overwrite)[0]


def checkpoints_features(meta: ijbc.IJBCMeta, checkpoints: list[Path], cache_dir: Path, actors: int,
                         overwrite: bool = False) -> list[np.ndarray]:
    """``checkpoint_features`` of several checkpoints with one actor pool and one pass.

    The checkpoints not yet cached are embedded together: each actor loads all of them once,
    and each image is read and aligned once. Each gets its own cache file.
    """
    from unibct_ray.checkpoint import load_checkpoint

    for c in checkpoints:
        load_checkpoint(c)  # refuse hostile/foreign files before any actor starts
    caches = [_cache_path(meta, Path(c), cache_dir) for c in checkpoints]
    result: list[np.ndarray | None] = [_cached(cache, len(meta.image_names), overwrite) for cache, _ in caches]
    # Each missing cache file once (the same checkpoint given twice is embedded once).
    todo = {caches[k]: str(checkpoints[k]) for k, r in enumerate(result) if r is None}
    if not todo:
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
    ds = ray.data.from_arrow(table).repartition(max(1, min(len(rows) // 256, 4 * actors))).map_batches(
        _AlignEmbed, fn_constructor_kwargs={"checkpoints": ckpts}, batch_size=64,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
    )
    feats: list[np.ndarray | None] = [None] * len(ckpts)
    done = np.zeros(len(rows), bool)
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


def _distractor_features(a: EvalArgs, cache_dir: Path) -> np.ndarray | None:
    if a.distractors <= 0:
        return None
    if a.distractor_features:
        arr = load_feature_file(a.distractor_features, None, "distractor features", min_rows=a.distractors)
        arr = arr[: a.distractors]
    elif a.old_checkpoint:
        arr = _render_distractors(a.old_checkpoint, a.distractors, a.seed, cache_dir, a.actors)
    else:
        raise UserError("--distractors needs old-model embeddings of distractor faces: give --old-checkpoint "
                        "(synthetic faces are rendered and embedded) or --distractor-features F.npy")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1)


class _RenderEmbed:
    """Actor-pool UDF: render synthetic faces (identities never used elsewhere) and embed them."""

    def __init__(self, checkpoint: str, seed: int):
        import torch

        from unibct_ray.checkpoint import build_backbone_from_checkpoint

        torch.set_num_threads(1)
        self.model, cfg, _ = build_backbone_from_checkpoint(checkpoint)
        self.size, self.seed = cfg.data.image_size, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from unibct_ray.data.faces import render_aligned, sample_identity

        imgs = []
        for i in batch["id"].tolist():
            ident = sample_identity(self.seed, 2_000_000_000 + i)  # far from training/eval ids
            imgs.append(render_aligned(ident, np.random.default_rng([self.seed, 99, i]), self.size))
        x = torch.from_numpy(to_tensor_layout(np.stack(imgs)))
        with torch.inference_mode():
            f = self.model(x) + self.model(torch.flip(x, dims=[3]))
        return {"id": batch["id"], "feature": f.float().numpy()}


def _render_distractors(checkpoint: Path, n: int, seed: int, cache_dir: Path, actors: int) -> np.ndarray:
    cache = cache_dir / f"distractors-{_file_hash(checkpoint)}-{seed}-{n}.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False)
    ds = ray.data.range(n).map_batches(
        _RenderEmbed, fn_constructor_kwargs={"checkpoint": str(checkpoint), "seed": seed}, batch_size=64,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    out = None
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        if out is None:
            out = np.zeros((n, b["feature"].shape[1]), np.float32)
        out[b["id"]] = b["feature"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, cache)
    return out


def run_eval(a: EvalArgs, connect: Callable[[], None] | None = None) -> dict:
    """Evaluate and write ``OUT/report.json``, ``report.md``, ``roc.png``, ``cmc.png``.

    ``connect`` (e.g. the CLI's ``ensure_ray``) is called after every input is checked, and only
    when Ray is needed (a checkpoint to embed, or ``shards > 1``).
    """
    from unibct_ray.distributed.knn import RayShardedKNN
    from unibct_ray.metrics.distractors import DistractorKNN, RecallKNN
    from unibct_ray.metrics.evaluate import evaluate_features
    from unibct_ray.metrics.knn import FaissKNN
    from unibct_ray.metrics.report import write_report

    if a.old_checkpoint and a.old_features or a.new_checkpoint and a.new_features:
        raise UserError("give a checkpoint or a feature file per model, not both")
    if not any([a.old_checkpoint, a.old_features, a.new_checkpoint, a.new_features]):
        raise UserError("nothing to evaluate: give --old-checkpoint/--old-features and/or --new-checkpoint/--new-features")
    if (a.out / "report.json").exists() and not a.overwrite:
        raise UserError(f"{a.out}/report.json: already exists (pass --overwrite to replace it)")
    if a.index not in ("flat", "ivf", "hnsw"):
        raise UserError(f"--index must be flat, ivf or hnsw, got {a.index!r}")
    meta = ijbc.read_ijbc_meta(a.ijbc)
    n = len(meta.image_names)
    cache = a.cache_dir if a.cache_dir is not None else a.out / "cache"

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
    if a.distractors > 0 and a.distractor_features:
        dist = load_feature_file(a.distractor_features, None, "distractor features", min_rows=a.distractors)
        if "old" in dims and dist.shape[1] != dims["old"][1]:
            raise DataFormatError(f"{a.distractor_features}: dimension {dist.shape[1]} differs from the old "
                                  f"model's {dims['old'][1]} ({dims['old'][0]})")
        del dist

    if connect is not None and (a.old_checkpoint or a.new_checkpoint or a.shards > 1):
        connect()

    # Both checkpoints (when both sides are models) in one extraction pass.
    embed = {w: c for w, c in (("old", a.old_checkpoint), ("new", a.new_checkpoint)) if c and w not in loaded}
    if embed:
        loaded.update(zip(embed, checkpoints_features(meta, list(embed.values()), cache, a.actors,
                                                      overwrite=a.overwrite)))
    old, new = loaded.get("old"), loaded.get("new")
    base = RayShardedKNN(shards=a.shards, index=a.index) if a.shards > 1 else FaissKNN(index=a.index)
    recall = RecallKNN(base) if a.index != "flat" else None
    knn = recall or base
    distractors = _distractor_features(a, cache)
    if distractors is not None:
        knn = DistractorKNN(knn, distractors)
    # The shard actors stay up for the evaluation's six searches (three tests x two galleries).
    with base if isinstance(base, RayShardedKNN) else contextlib.nullcontext():
        report, curves = evaluate_features(meta, old, new, knn=knn, criterion_far=a.criterion_far,
                                           bootstrap=a.bootstrap, seed=a.seed)
    report.setdefault("protocol", {}).update({
        "ijbc": str(meta.root), "index": a.index, "shards": a.shards, "distractors": a.distractors,
        "old": str(a.old_checkpoint or a.old_features or ""), "new": str(a.new_checkpoint or a.new_features or ""),
        "pixel_normalisation": "(x - 127.5) / 127.5", "alignment": "5-point similarity to the ArcFace template",
    })
    if recall is not None:
        report["knn_recall_at_k"] = {"k": "the 1:N search depth", "mean": float(np.mean(recall.recalls)) if recall.recalls else None,
                                     "per_search": [float(r) for r in recall.recalls]}
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(report, a.out, curves.roc, curves.cmc)
    return report
