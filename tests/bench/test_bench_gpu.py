"""``bench gpu``: one clear line without CUDA; ``--allow-cpu`` runs every phase's code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from unibct_ray.bench import gpu as bench_gpu_module
from unibct_ray.bench.common import jpeg_shards


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
@pytest.mark.parametrize("cmd", [["-m", "unibct_ray.cli", "bench", "gpu"], ["-m", "unibct_ray.bench.gpu"]])
def test_without_cuda_exits_2_with_one_line(cmd, tmp_path):
    proc = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "unibct-ray: error: no CUDA device: bench gpu needs one (--allow-cpu runs a tiny smoke form on the CPU)"]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_jpeg_shards_repeat_distinct_images_and_reuse_the_set(tmp_path):
    import pyarrow.parquet as pq

    from unibct_ray.data.images import decode_images
    from unibct_ray.data.shards import read_manifest

    out = jpeg_shards(tmp_path / "s", 25, size=32, distinct=4, per_class=10, rows_per_shard=10)
    m = read_manifest(out)
    assert (m.rows, m.classes, [s.rows for s in m.shards]) == (25, 3, [10, 10, 5])
    t = pq.read_table(m.files[0])
    assert t.column("label").to_pylist() == [0] * 10 and t.column("index").to_pylist() == list(range(1, 11))
    imgs = t.column("image").to_pylist()
    assert imgs[0] == imgs[4] == imgs[8] and len(set(imgs)) == 4
    x = decode_images(imgs[:4], 32)
    assert x.shape == (4, 3, 32, 32) and x.std() > 0.05  # real pictures, not blank
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert jpeg_shards(tmp_path / "s", 25, size=32, distinct=4, per_class=10, rows_per_shard=10) == out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime  # same parameters: kept, not rewritten


def test_torch_refinement_loop_matches_numpy_loop():
    from unibct_ray.bench.refine import class_sizes, loop_refine, synthetic_features

    sizes = class_sizes(12, mean_size=6, max_size=20)
    old, new, labels = synthetic_features(sizes, d=8)
    got = bench_gpu_module.loop_refine_torch(old, new, labels, 12, torch.device("cpu")).numpy()
    np.testing.assert_allclose(got, loop_refine(old, new, labels, 12), atol=2e-5)


@pytest.mark.slow
def test_allow_cpu_smoke_runs_every_phase(tmp_path):
    """In its own process and its own Ray: in full-suite runs, the suite's shared Ray session was
    broken after this bench ran in it (the next test's tasks never ran, or the raylet crashed in
    HandleRequestWorkerLease), which no run of the bench alone showed."""
    if torch.cuda.is_available():
        pytest.skip("the smoke sizes are the CPU form")
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "unibct_ray.bench.gpu", "--out", str(tmp_path / "gpu"),
                           "--allow-cpu", "--tests", "tests/distributed/test_gpu.py", "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["sizes"]["backbone"] == "tiny"
    train = res["train"]
    assert train["plain"]["finite"] and train["ray"]["finite"]
    assert len(train["ray"]["images_per_s_per_epoch"]) == 2 and train["ray"]["images_per_s"] > 0
    ex = res["extract"]
    assert ex["images"] == 96 and ex["ray"]["images_per_s"] > 0 and ex["plain"]["images_per_s"] > 0
    assert ex["same_features"] and ex["max_rel_feature_diff"] < 1e-4  # CPU float32 both ways
    assert res["refine"]["max_abs_diff"] < 1e-4 and res["refine"]["rows"] > res["refine"]["classes"]
    tests = res["tests"]
    assert tests["ran"] and tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 3
    assert tests["exit_code"] == 0 and res["ok"] is True
