"""The plan on a real Ray: the node adapter, and a run refused before any fit()."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.cli import main


def test_cluster_nodes_reads_the_session_ray(ray_session):
    from unibct_ray.distributed.plan import cluster_nodes

    nodes = cluster_nodes()
    total = ray_session.cluster_resources()
    alive = [n for n in ray_session.nodes() if n["Alive"]]
    assert len(nodes) == len(alive)
    assert sum(n.get("CPU", 0) for n in nodes) == total["CPU"] == 4
    assert sum(n.get("GPU", 0) for n in nodes) == total.get("GPU", 0)
    assert sum(n["memory"] for n in nodes) == total["memory"]
    assert sum(n["object_store_memory"] for n in nodes) == total["object_store_memory"]
    assert [n["head"] for n in nodes] == [True]


def _tiny_shards(out: Path, rows: int = 16) -> Path:
    import io

    from PIL import Image

    import pyarrow as pa

    from unibct_ray.data.shards import SHARD_SCHEMA, shard_name, write_manifest, write_shard

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "JPEG")
    table = pa.table({"image": [buf.getvalue()] * rows, "label": np.arange(rows) // 4, "index": np.arange(rows) + 1},
                     schema=SHARD_SCHEMA)
    out.mkdir(parents=True)
    write_manifest(out, [write_shard(out / shard_name(0), table)], rows=rows, classes=rows // 4,
                   columns=["image", "label", "index"])
    return out


def test_a_run_that_starves_decoding_exits_2_before_any_fit(ray_session, tmp_path, capsys):
    shards = _tiny_shards(tmp_path / "shards")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: starved\nstorage: {tmp_path / 'runs'}\ndata: {{train: {shards}, image_size: 32}}\n"
                   "model: {backbone: tiny, embedding_size: 16}\nglobal_batch: 8\noptim: {epochs: 1}\n")
    t0 = time.perf_counter()
    rc = main(["train", "--config", str(cfg), "--num-cpus", "4", "--set", "num_workers=2", "--set", "cpus_per_worker=2"])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and took < 30, (rc, took)
    assert err == ["unibct-ray: error: plan: the training ingest needs 1 CPU for a decode task beside 2 workers x "
                   "2 CPUs, but the node has 4 CPUs: lower cpus_per_worker (e.g. 1) or decode_cpus, or add CPUs"]
    assert not (tmp_path / "runs" / "starved").exists()  # nothing written, no fit() started
    # --plan prints the same plan as a table and exits 2; a run that fits exits 0 with --plan.
    assert main(["train", "--config", str(cfg), "--plan", "--set", "num_workers=2", "--set", "cpus_per_worker=2"]) == 2
    out = capsys.readouterr().out
    assert "training" in out and "SHORTFALL" in out
    assert main(["train", "--config", str(cfg), "--plan", "--set", "num_workers=2"]) == 0
    assert "verdict: the run can start" in capsys.readouterr().out


@pytest.mark.slow
def test_shipped_configs_on_a_local_ray_shaped_like_the_shipped_cluster(tmp_path):
    """A local Ray declaring the shipped cluster's logical resources (0-CPU head, 2 x 32 CPUs
    + 4 GPUs), in a child process: ``ray.nodes()`` of it refuses 8 CPUs per worker and passes 6."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[2]
    ray_tmp = tempfile.mkdtemp(prefix="rpl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_raylet_start_wait_time_s="120",
               RAY_prestart_worker_first_driver="0")  # 64 logical CPUs must not prestart 64 workers
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("plan_cluster_run.py")),
                               str(root / "jobs/configs/ms1mv3/open-class/new-unibct.yaml"), str(tmp_path / "out.json")],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert sorted((n["CPU"] if "CPU" in n else 0, n.get("GPU", 0), n["head"]) for n in out["nodes"]) == [
        (0, 0, True), (32, 4, False), (32, 4, False)]
    assert out["plans"]["8"].startswith("plan: the training ingest needs 1 CPU for a decode task beside 8 workers "
                                        "x 8 CPUs + 0.75 GPU, but the 2 worker nodes have 64 CPUs and the head 0")
    assert out["plans"]["6"] is None
