"""``unibct-ray prototypes``: validated inputs -> prototypes ``.npy`` (atomic write)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from unibct_ray.errors import DataFormatError, UserError, npy_error

__all__ = ["load_matrix", "run_prototypes"]


def load_matrix(path: Path, what: str, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise npy_error(path, e) from None
    if arr.ndim != ndim:
        raise DataFormatError(f"{path}: {what} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise DataFormatError(f"{path}: {what} holds NaN/inf (first at row {bad})")
    return arr


def run_prototypes(a: argparse.Namespace) -> None:
    if a.out.exists() and not a.overwrite:
        raise UserError(f"{a.out}: already exists (pass --overwrite to replace it)")
    old = load_matrix(a.old_features, "old features", 2)
    labels = load_matrix(a.labels, "labels", 1)
    if old.dtype.kind != "f":
        raise DataFormatError(f"{a.old_features}: features must be float, got {old.dtype}")
    if labels.dtype.kind not in "iu":
        raise DataFormatError(f"{a.labels}: labels must be integers, got {labels.dtype}")
    if len(labels) != len(old):
        raise DataFormatError(f"{a.labels}: {len(labels)} labels for {len(old)} feature rows in {a.old_features}")
    if len(labels) and labels.min() < 0:
        raise DataFormatError(f"{a.labels}: negative class label {int(labels.min())}")
    if a.no_refine:
        new = old
    else:
        if a.new_features is None:
            raise UserError("--new-features is required unless --no-refine")
        new = load_matrix(a.new_features, "new features", 2)
        if new.shape[0] != old.shape[0]:
            raise DataFormatError(f"{a.new_features}: {new.shape[0]} rows, {a.old_features} has {old.shape[0]}")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    old32, new32, lab = old.astype(np.float32), new.astype(np.float32), labels.astype(np.int64)
    if a.workers > 1:
        from unibct_ray.distributed.prototypes import RefineParams, refine_distributed
        from unibct_ray.distributed.runtime import ensure_ray

        ensure_ray()
        protos = refine_distributed(old32, new32, lab, num_classes,
                                    RefineParams(a.lam, a.temperature, a.axis, not a.no_refine), a.workers)
    else:
        from unibct_ray.compat.prototypes import refine_prototypes

        protos = refine_prototypes(old32, new32, lab, num_classes, lam=a.lam, tau=a.temperature,
                                   axis=a.axis, refine=not a.no_refine)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp.npy")
    np.save(tmp, np.asarray(protos, np.float32))
    os.replace(tmp, a.out)
    print(f"wrote {num_classes} prototypes of dimension {old.shape[1]} to {a.out}")
