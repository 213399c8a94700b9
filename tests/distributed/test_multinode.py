"""A simulated 2-node cluster: FAISS shards and refinement actors land on different nodes.

``ray.cluster_utils.Cluster`` runs in a child process (``multinode_run.py``) with its own Ray
temp dir, so it neither joins nor disturbs the session's local Ray, nor any other Ray on this
machine (a ``ray.init()`` without an address connects to the latest cluster recorded in the
temp dir). Results are checked here against plain numpy top-k and the in-process refinement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.compat.prototypes import refine_prototypes

HELPER = Path(__file__).with_name("multinode_run.py")
LAM, TAU = 0.9, 0.05


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def inputs() -> dict:
    rng = np.random.default_rng(7)
    sizes = np.r_[1, 2, rng.integers(3, 25, size=14)]  # a one-image class included
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)  # rows in any order: refine_distributed sorts by class
    old = unit(rng.standard_normal((len(labels), 16)))
    new = unit(old + 0.3 * rng.standard_normal(old.shape))
    return {"gallery": unit(rng.standard_normal((3001, 24))), "queries": unit(rng.standard_normal((40, 24))),
            "k": 10, "old": old, "new": new, "labels": labels, "num_classes": len(sizes), "lam": LAM, "tau": TAU}


@pytest.fixture(scope="module")
def cluster_run(inputs, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    np.savez(work / "in.npz", **inputs)
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A node gets 120 s to register instead of 60: on a loaded CI machine start-up alone can take a minute.
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_raylet_start_wait_time_s="120")
    try:
        proc = subprocess.run([sys.executable, str(HELPER), str(work / "in.npz"), str(work)], env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    placement = json.loads((work / "placement.json").read_text())
    return placement, dict(np.load(work / "out.npz"))


def test_two_nodes_started(cluster_run):
    placement, _ = cluster_run
    assert len(placement["nodes"]) == 2


def test_faiss_shards_on_different_nodes_and_exact_topk(inputs, cluster_run):
    placement, out = cluster_run
    assert len(placement["knn"]) == 2
    assert sorted(placement["knn"]) == placement["nodes"]  # one shard per node
    sims = inputs["queries"].astype(np.float64) @ inputs["gallery"].astype(np.float64).T
    ref_idx = np.argsort(-sims, axis=1, kind="stable")[:, : inputs["k"]]
    np.testing.assert_array_equal(out["indices"], ref_idx)
    np.testing.assert_allclose(out["scores"], np.take_along_axis(sims, ref_idx, 1), atol=1e-5)


def test_refinement_actors_on_different_nodes_match_in_process(inputs, cluster_run):
    placement, out = cluster_run
    assert sorted(placement["refine"]) == placement["nodes"]  # one actor per node
    ref = refine_prototypes(inputs["old"], inputs["new"], inputs["labels"], inputs["num_classes"],
                            lam=LAM, tau=TAU).numpy()
    assert out["prototypes"].shape == ref.shape == (inputs["num_classes"], 16)
    np.testing.assert_allclose(out["prototypes"], ref, atol=1e-5)
    # and not trivially: refinement moved the prototypes away from the plain class means
    means = unit(np.stack([inputs["old"][inputs["labels"] == c].mean(0) for c in range(inputs["num_classes"])]))
    assert np.abs(out["prototypes"] - means).max() > 1e-3
