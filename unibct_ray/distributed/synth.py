"""``data synth``: render the synthetic benchmark as parallel Ray tasks.

Training identities are rendered in chunks, each task writing a part ``.rec`` with the final
record keys; the driver concatenates the parts and appends the identity and header records.
IJB-C images are rendered in row chunks straight into ``IJBC/loose_crop``. Everything happens
in a staging directory that is renamed to ``--out`` only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from unibct_ray.data import ijbc_writers
from unibct_ray.data.recordio import RecordIOWriter
from unibct_ray.data.shards import StagedDir, atomic_write_text
from unibct_ray.data.synth import (
    SynthSpec,
    class_sizes,
    plan_ijbc,
    render_ijbc_rows,
    training_truth,
    write_train_part,
    write_train_trailer,
)
from unibct_ray.distributed.runtime import run_tasks

__all__ = ["synthesize"]

_TARGET_IMAGES_PER_TASK = 2_000


@ray.remote(num_cpus=1)
def _train_task(spec: SynthSpec, first: int, end: int, rec_path: str) -> int:
    return write_train_part(spec, first, end, Path(rec_path))


@ray.remote(num_cpus=1)
def _ijbc_task(spec: SynthSpec, plan_ref, start: int, end: int, image_dir: str):
    return render_ijbc_rows(spec, plan_ref, range(start, end), Path(image_dir))


def _chunks(weights: np.ndarray, target: int, min_chunks: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges of items with about ``target`` total weight each."""
    n = len(weights)
    if n == 0:
        return []
    total = int(weights.sum())
    n_chunks = max(min(n, min_chunks), -(-total // target))
    bounds = np.searchsorted(np.cumsum(weights), np.linspace(0, total, n_chunks + 1)[1:-1], side="right")
    edges = np.unique(np.r_[0, bounds, n])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def synthesize(spec: SynthSpec, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``out/train.rec``, ``out/train.idx``, ``out/train_truth.parquet``, ``out/IJBC/``
    and ``out/synth.json``."""
    spec.validate()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    sizes = class_sizes(spec)
    with StagedDir(out, overwrite=overwrite) as stage:
        parts = stage.path / "parts"
        parts.mkdir()
        train_chunks = _chunks(sizes, _TARGET_IMAGES_PER_TASK, cpus)
        jobs = [(i, int(sizes[a:b].sum()), lambda i=i, a=a, b=b: _train_task.remote(spec, a, b, str(parts / f"part-{i:05d}.rec")))
                for i, (a, b) in enumerate(train_chunks)]

        plan = plan_ijbc(spec) if spec.eval_identities else None
        n_eval = len(plan.names) if plan else 0
        if plan:
            ijbc_dir = stage.path / "IJBC"
            (ijbc_dir / "loose_crop").mkdir(parents=True)
            (ijbc_dir / "meta").mkdir()
            plan_ref = ray.put(plan)
            for a, b in _chunks(np.ones(n_eval, np.int64), _TARGET_IMAGES_PER_TASK, cpus):
                jobs.append((("ijbc", a), b - a, lambda a=a, b=b: _ijbc_task.remote(
                    spec, plan_ref, a, b, str(ijbc_dir / "loose_crop"))))
        results = run_tasks(jobs, desc="synth", progress=progress)

        with RecordIOWriter(stage.path / "train.rec") as w:
            for i in range(len(train_chunks)):
                part = parts / f"part-{i:05d}.rec"
                w.append_file(part, part.with_suffix(".idx"))
            header = write_train_trailer(spec, w)
        shutil.rmtree(parts)
        truth = training_truth(spec)
        pq.write_table(pa.table(truth.columns()), stage.path / "train_truth.parquet")

        if plan:
            starts = sorted(k[1] for k in results if isinstance(k, tuple))
            lms = np.concatenate([results[("ijbc", a)][0] for a in starts])
            scores = np.concatenate([results[("ijbc", a)][1] for a in starts])
            meta = ijbc_dir / "meta"
            ijbc_writers.write_tid_mid(meta / "ijbc_face_tid_mid.txt", plan.names, plan.templates, plan.medias)
            ijbc_writers.write_5pts_score(meta / "ijbc_name_5pts_score.txt", plan.names, lms, scores)
            ijbc_writers.write_pair_label(meta / "ijbc_template_pair_label.txt", plan.pairs, plan.pair_labels)
            for fname, (tids, _) in (("ijbc_1N_gallery_G1.csv", plan.g1), ("ijbc_1N_gallery_G2.csv", plan.g2),
                                     ("ijbc_1N_probe_mixed.csv", plan.probes)):
                rows = np.flatnonzero(np.isin(plan.templates, tids))
                ijbc_writers.write_1n_csv(meta / fname, plan.templates[rows], plan.subjects[rows],
                                  [f"loose_crop/{plan.names[r]}" for r in rows])

        summary = {
            "out": str(Path(out)),
            "train": {"identities": spec.identities, "images": int(sizes.sum()),
                      "size_max": int(sizes.max()), "noisy_images": int(truth.noisy.sum()),
                      "outlier_images": int(truth.outlier.sum()),
                      "rec_bytes": (stage.path / "train.rec").stat().st_size,
                      "header": [header.image_end, header.second]},
            "ijbc": None if not plan else {
                "subjects": spec.eval_identities, "images": n_eval,
                "templates": int(len(np.unique(plan.templates))),
                "pairs": int(len(plan.pairs)), "genuine_pairs": int(plan.pair_labels.sum()),
                "gallery_G1": int(len(plan.g1[0])), "gallery_G2": int(len(plan.g2[0])),
                "probes": int(len(plan.probes[0])),
            },
        }
        atomic_write_text(stage.path / "synth.json",
                          json.dumps({"spec": spec.to_json(), "summary": summary}, indent=2, default=str) + "\n")
        stage.commit()
    return summary
