"""``unibct-ray eval``: IJB-C 1:1 and 1:N, self and cross, from checkpoints or features.

From a checkpoint, every IJB-C image is aligned to the model's input size with its 5
landmarks and embedded as ``emb(img) + emb(flipped img)`` on a Ray actor pool (the model is
loaded once per actor, with ``weights_only``). Features are cached in ``OUT/cache/`` under the
checkpoint's content hash, so a rerun, or an evaluation interrupted after one model, does not
recompute them. The metrics are the pure functions of ``unibct_ray.metrics``; 1:N searches go
through FAISS shards on Ray actors.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from unibct_ray.data import ijbc
from unibct_ray.data.images import to_tensor_layout
from unibct_ray.data.shards import atomic_write_text
from unibct_ray.errors import DataFormatError, UserError

__all__ = ["EvalArgs", "run_eval", "load_feature_file", "checkpoint_features"]


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


def load_feature_file(path: Path, n_images: int, what: str) -> np.ndarray:
    """A ``.npy`` of per-image features (float32/float16, rows in 5pts-file order) -> float32."""
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} file not found")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    if arr.dtype not in (np.float32, np.float16):
        raise DataFormatError(f"{path}: {what} must be float32 or float16, got {arr.dtype}")
    if arr.ndim != 2:
        raise DataFormatError(f"{path}: {what} must be 2-D [images, dim], got shape {arr.shape}")
    if arr.shape[0] != n_images:
        raise DataFormatError(f"{path}: {arr.shape[0]} rows, but the IJB-C meta lists {n_images} images "
                              "(rows must follow ijbc_name_5pts_score.txt)")
    out = np.asarray(arr, np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataFormatError(f"{path}: {what} row {int(np.flatnonzero(bad)[0])} holds NaN/inf")
    return out


class _AlignEmbed:
    """Actor-pool UDF: read, align (5 points), embed image + mirror, sum."""

    def __init__(self, checkpoint: str):
        import torch

        from unibct_ray.checkpoint import build_backbone_from_checkpoint

        torch.set_num_threads(1)
        self.model, cfg, _ = build_backbone_from_checkpoint(checkpoint)
        self.size = cfg.data.image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        from unibct_ray.data.landmarks import align_face

        crops = []
        for path, lm in zip(batch["path"], batch["landmarks"]):
            try:
                with Image.open(str(path)) as im:
                    img = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DataFormatError(f"{path}: image does not decode ({e})") from None
            crops.append(align_face(img, np.asarray(lm, np.float32).reshape(5, 2), self.size))
        x = torch.from_numpy(to_tensor_layout(np.stack(crops)))
        with torch.inference_mode():
            f = self.model(x) + self.model(torch.flip(x, dims=[3]))
        return {"row": batch["row"], "feature": f.float().numpy()}


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:20]


def checkpoint_features(meta: ijbc.IJBCMeta, checkpoint: Path, cache_dir: Path, actors: int) -> np.ndarray:
    """Per-image ``emb + emb_flip`` [n, d] of a checkpoint over the IJB-C images (cached)."""
    from unibct_ray.checkpoint import load_checkpoint

    load_checkpoint(checkpoint)  # refuse hostile/foreign files before any actor starts
    key = _file_hash(checkpoint)
    # The folder's fingerprint too: a cache shared between IJB-C folders must not mix them up.
    h = hashlib.sha256("\n".join(meta.image_names).encode())
    h.update(np.ascontiguousarray(meta.landmarks, np.float32).tobytes())
    key = f"{key}-{h.hexdigest()[:12]}"
    cache = cache_dir / f"features-{key}.npy"
    if cache.exists():
        arr = np.load(cache, allow_pickle=False)
        if arr.shape[0] == len(meta.image_names):
            return arr
    img_dir = meta.root / "loose_crop"
    rows = np.arange(len(meta.image_names))
    table = pa.table({
        "row": rows,
        "path": [str(img_dir / n) for n in meta.image_names],
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(meta.landmarks.reshape(-1), pa.float32()), 10),
    })
    ds = ray.data.from_arrow(table).repartition(max(1, min(len(rows) // 256, 4 * actors))).map_batches(
        _AlignEmbed, fn_constructor_kwargs={"checkpoint": str(checkpoint)}, batch_size=64,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
    )
    feats = None
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        if feats is None:
            feats = np.zeros((len(rows), batch["feature"].shape[1]), np.float32)
        feats[batch["row"]] = batch["feature"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, cache)
    atomic_write_text(cache.with_suffix(".json"), json.dumps({"checkpoint": str(checkpoint), "sha256_20": key,
                                                              "rows": len(rows)}) + "\n")
    return feats


def _distractor_features(a: EvalArgs, cache_dir: Path) -> np.ndarray | None:
    if a.distractors <= 0:
        return None
    if a.distractor_features:
        arr = np.load(a.distractor_features, allow_pickle=False)
        if arr.ndim != 2 or arr.shape[0] < a.distractors:
            raise DataFormatError(f"{a.distractor_features}: need at least {a.distractors} rows of [n, d], got {arr.shape}")
        arr = arr[: a.distractors].astype(np.float32)
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
        return np.load(cache)
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


def run_eval(a: EvalArgs) -> dict:
    """Evaluate and write ``OUT/report.json``, ``report.md``, ``roc.png``, ``cmc.png``."""
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

    def side(ckpt: Path | None, feats: Path | None, what: str) -> np.ndarray | None:
        if feats:
            return load_feature_file(feats, n, what)
        if ckpt:
            return checkpoint_features(meta, ckpt, cache, a.actors)
        return None

    old = side(a.old_checkpoint, a.old_features, "old features")
    new = side(a.new_checkpoint, a.new_features, "new features")
    if old is not None and new is not None and old.shape[1] != new.shape[1]:
        src_o, src_n = a.old_checkpoint or a.old_features, a.new_checkpoint or a.new_features
        raise DataFormatError(f"{src_n}: embedding size {new.shape[1]} differs from {src_o} ({old.shape[1]}); "
                              "a cross-model test needs one embedding space")
    base = RayShardedKNN(shards=a.shards, index=a.index) if a.shards > 1 else FaissKNN(index=a.index)
    recall = RecallKNN(base) if a.index != "flat" else None
    knn = recall or base
    distractors = _distractor_features(a, cache)
    if distractors is not None:
        knn = DistractorKNN(knn, distractors)
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
