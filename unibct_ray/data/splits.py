"""The four upgrade scenarios: which images the old and the new model train on.

Per class with ``n`` images in record order and split ratio ``r``:

* class split: the first ``round(C * r)`` classes form ``class-r``, the rest ``class-(1-r)``;
* data split: the first ``k = max(1, round(r * n))`` images go to ``data-r``, the remaining
  ``n - k`` to ``data-(1-r)``; a class with one image is in both halves.

``round`` is Python's (half to even: n = 5, 15, 25 at r = 0.3 give k = 2, 4, 8), which is
what reproduces the public MS1Mv3 split counts.

=============== ==================== =========================
scenario        old model trains on  new model trains on
=============== ==================== =========================
extended-data   data-r               everything
extended-class  class-r              everything
open-data       data-r               data-(1-r)
open-class      class-r              class-(1-r)
=============== ==================== =========================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from unibct_ray.data.shards import (
    Manifest,
    StagedDir,
    atomic_write_text,
    read_columns,
    read_manifest,
    write_manifest,
    write_shard,
)
from unibct_ray.errors import UserError

__all__ = ["SCENARIOS", "DATA_SPLIT_SCENARIOS", "SplitMasks", "class_split", "data_split", "scenario_masks", "contiguous_labels", "split_shards"]

SCENARIOS = ("extended-data", "extended-class", "open-data", "open-class")
DATA_SPLIT_SCENARIOS = ("extended-data", "open-data")  # the old model sees a share of every identity's images


@dataclass(frozen=True)
class SplitMasks:
    """Row masks (bool [n]) over the source rows."""

    old: np.ndarray
    new: np.ndarray


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio must be strictly between 0 and 1, got {ratio}")


def class_split(labels: np.ndarray, ratio: float) -> np.ndarray:
    """bool [n]: rows whose class is among the first ``round(C * ratio)`` classes (by class id)."""
    _check_ratio(ratio)
    classes = np.unique(labels)
    n_first = round(len(classes) * ratio)
    return np.isin(labels, classes[:n_first])


def data_split(labels: np.ndarray, order_key: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(data-r, data-(1-r)) bool [n] masks; "first" images = smallest ``order_key`` in a class."""
    _check_ratio(ratio)
    n = len(labels)
    order = np.lexsort((order_key, labels))  # by class, then record order
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, n])
    # Python's round on the few distinct class sizes (numpy would agree on halves, but the
    # contract is Python's rule, so use it literally).
    k_of = {int(s): max(1, round(ratio * int(s))) for s in np.unique(sizes)}
    k = np.array([k_of[int(s)] for s in sizes], np.int64)
    rank = np.arange(n) - np.repeat(starts, sizes)  # position within its class
    first_sorted = rank < np.repeat(k, sizes)
    rest_sorted = ~first_sorted | np.repeat(sizes == 1, sizes)
    first = np.empty(n, bool)
    rest = np.empty(n, bool)
    first[order] = first_sorted
    rest[order] = rest_sorted
    return first, rest


def scenario_masks(scenario: str, labels: np.ndarray, order_key: np.ndarray, ratio: float) -> SplitMasks:
    """Old/new training rows for one of ``SCENARIOS``."""
    everything = np.ones(len(labels), bool)
    if scenario in DATA_SPLIT_SCENARIOS:
        data_r, data_rest = data_split(labels, order_key, ratio)
        return SplitMasks(data_r, everything if scenario == "extended-data" else data_rest)
    if scenario in ("extended-class", "open-class"):
        class_r = class_split(labels, ratio)
        return SplitMasks(class_r, everything if scenario == "extended-class" else ~class_r)
    raise UserError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")


def contiguous_labels(source_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map class ids to ``0..C-1`` in increasing id order -> (new labels [n], classes [C])."""
    classes, inverse = np.unique(source_labels, return_inverse=True)
    return inverse.astype(np.int64), classes


def split_shards(
    src: str | os.PathLike,
    scenario: str,
    ratio: float,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``out/old`` and ``out/new`` shard sets for ``scenario`` and return the summary.

    Each set keeps the columns of the source plus ``source_label``; ``label`` is contiguous
    within the set. ``out/manifest.json`` holds the counts (also returned).
    """
    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    _check_ratio(ratio)
    manifest = read_manifest(src)
    cols = read_columns(manifest, ["label", "index"])
    labels, index = cols["label"], cols["index"]
    masks = scenario_masks(scenario, labels, index, ratio)
    summary: dict = {"scenario": scenario, "ratio": ratio, "source": str(manifest.path.resolve()),
                     "source_rows": int(manifest.rows), "source_classes": int(len(np.unique(labels)))}
    with StagedDir(out, overwrite=overwrite) as stage:
        for side, mask in (("old", masks.old), ("new", masks.new)):
            new_labels, classes = contiguous_labels(labels[mask])
            lut = np.full(int(labels.max()) + 1, -1, np.int64)
            lut[classes] = np.arange(len(classes))
            summary[side] = _write_side(manifest, mask, lut, stage.path / side, side, progress)
            summary[side]["classes"] = int(len(classes))
            write_manifest(stage.path / side, summary[side].pop("_shards"), rows=int(mask.sum()),
                           classes=len(classes), columns=["image", "label", "index", "source_label"],
                           split={"scenario": scenario, "ratio": ratio, "side": side,
                                  "source": summary["source"]})
        both = masks.old & masks.new
        summary["overlap"] = {"images": int(both.sum()),
                              "classes": int(len(np.intersect1d(labels[masks.old], labels[masks.new])))}
        atomic_write_text(stage.path / "manifest.json", json.dumps(summary, indent=2) + "\n")
        stage.commit()
    return summary


def _write_side(manifest: Manifest, mask: np.ndarray, lut: np.ndarray, out_dir: Path, side: str, progress: bool) -> dict:
    out_dir.mkdir()
    shards, offset = [], 0
    for s in tqdm(manifest.shards, desc=f"split {side}", unit="shard", disable=not progress):
        part_mask = mask[offset : offset + s.rows]
        offset += s.rows
        if s.rows == 0 or not part_mask.any():
            continue
        table = pq.read_table(manifest.path / s.file, columns=["image", "label", "index"])
        table = table.filter(pa.array(part_mask))
        source = table.column("label").to_numpy()
        table = pa.table(
            {
                "image": table.column("image"),
                "label": pa.array(lut[source], pa.int64()),
                "index": table.column("index"),
                "source_label": pa.array(source, pa.int64()),
            }
        )
        shards.append(write_shard(out_dir / s.file, table))
    return {"rows": int(mask.sum()), "_shards": shards}
