"""Speed of the vectorised prototype refinement against a per-class Python loop.

``python -m unibct_ray.bench.refine`` prints JSON: on ``--classes`` classes (2,000)
with lognormal sizes (mean ~55, capped at 600, as in MS1M) and ``d = 256``, the vectorised
:func:`~unibct_ray.compat.prototypes.refine_prototypes` and a plain per-class numpy loop with
an explicit inverse run side by side on the same data, threads and dtype (float32); then the
vectorised pass alone at 1k, 2k, 5k and 10k classes (the work is linear in the number of
classes at a fixed size distribution).

Timings are the minimum over interleaved repeats (vectorised, loop, vectorised, ...), the
estimator least affected by other processes on a shared machine; the load average before and
after is reported. ``--threads`` caps torch's OpenMP and numpy's BLAS threads alike (via
threadpoolctl, a scikit-learn dependency) when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from typing import Sequence

import numpy as np


__all__ = ["class_sizes", "synthetic_features", "loop_refine", "bench_refine", "add_arguments", "run"]


def class_sizes(num_classes: int, mean_size: float = 55.0, max_size: int = 600, sigma: float = 0.8,
                seed: int = 0) -> np.ndarray:
    """Lognormal class sizes ``int64 [C]`` in ``[1, max_size]`` with mean ~``mean_size``."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean_size) - sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, num_classes)), 1, max_size).astype(np.int64)


def synthetic_features(sizes: np.ndarray, d: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered ``old, new float32 [n, d]`` and label-sorted ``labels int64 [n]``."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    lab_t = torch.from_numpy(labels)
    feats = []
    for _ in range(2):
        centres = torch.randn(sizes.size, d, generator=gen)
        feats.append((centres[lab_t] + 0.7 * torch.randn(labels.size, d, generator=gen)).numpy())
    return feats[0], feats[1], labels


def loop_refine(old: np.ndarray, new: np.ndarray, labels: np.ndarray, num_classes: int, lam: float = 0.9,
                tau: float = 0.05) -> np.ndarray:
    """The obvious implementation: one class at a time, explicit ``inv``, label-sorted rows."""
    out = np.zeros((num_classes, old.shape[1]), dtype=old.dtype)
    bounds = np.searchsorted(labels, np.arange(num_classes + 1))
    for c in range(num_classes):
        o, n = old[bounds[c]:bounds[c + 1]], new[bounds[c]:bounds[c + 1]]
        if len(o) == 0:
            continue
        if len(o) == 1:
            out[c] = o[0] / np.linalg.norm(o[0])
            continue
        nh = n / np.linalg.norm(n, axis=1, keepdims=True)
        s = nh @ nh.T / tau
        np.fill_diagonal(s, -np.inf)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        o_ref = (1 - lam) * np.linalg.inv(np.eye(len(o), dtype=o.dtype) - lam * p) @ o
        m = o_ref.mean(axis=0)
        out[c] = m / np.linalg.norm(m)
    return out


def bench_refine(num_classes: int, mean_size: float = 55, max_size: int = 600, d: int = 256, seed: int = 0,
                 loop: bool = True, repeats: int = 3) -> dict:
    """Time the vectorised refinement and, if ``loop``, the per-class loop on the same data.

    Both are timed ``repeats`` times, interleaved; the minimum is reported. Returns sizes,
    seconds, the speed-up and the max abs difference between the two results (a check that
    the loop computes the same prototypes).
    """
    from unibct_ray.compat.prototypes import refine_prototypes

    sizes = class_sizes(num_classes, mean_size, max_size, seed=seed)
    old, new, labels = synthetic_features(sizes, d, seed=seed)
    t_vec = t_loop = math.inf
    protos = ref = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        protos = refine_prototypes(old, new, labels, num_classes)
        t_vec = min(t_vec, time.perf_counter() - t0)
        if loop:
            t0 = time.perf_counter()
            ref = loop_refine(old, new, labels, num_classes)
            t_loop = min(t_loop, time.perf_counter() - t0)
    res = {
        "classes": num_classes,
        "images": int(sizes.sum()),
        "mean_size": round(float(sizes.mean()), 1),
        "max_size": int(sizes.max()),
        "distinct_sizes": int(np.unique(sizes).size),
        "d": d,
        "vectorised_s": round(t_vec, 4),
    }
    if loop:
        res["loop_s"] = round(t_loop, 4)
        res["speedup"] = round(t_loop / t_vec, 2)
        res["max_abs_diff"] = float(np.abs(protos.numpy() - ref).max())
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=int, default=2000, help="classes of the side-by-side comparison")
    p.add_argument("--scaling", type=int, nargs="*", default=[1000, 2000, 5000, 10000],
                    help="class counts for the vectorised-only scaling run")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the minimum is reported")
    p.add_argument("--threads", type=int, default=None,
                    help="cap torch and BLAS threads (default: leave the libraries' defaults)")


def run(args: argparse.Namespace) -> dict:
    import torch

    limiter = contextlib.nullcontext()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limiter = threadpool_limits(limits=args.threads)
    with limiter:
        report = {
            "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()},
            "load_avg_before": [round(x, 2) for x in os.getloadavg()],
            "dtype": "float32",
            "comparison": bench_refine(args.classes, d=args.d, seed=args.seed, repeats=args.repeats),
            "scaling": [],
        }
        for c in args.scaling:
            r = bench_refine(c, d=args.d, seed=args.seed, loop=False, repeats=args.repeats)
            r["us_per_class"] = round(1e6 * r["vectorised_s"] / c, 1)
            report["scaling"].append(r)
        report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("refine", __doc__, add_arguments, run)
