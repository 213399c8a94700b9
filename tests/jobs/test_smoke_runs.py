"""The jobs' --smoke-test end to end on the session's local Ray: prepare -> train -> evaluate.

Each step runs the real job module's ``main`` (the same code `ray job submit` runs); the next
step consumes what the previous one wrote, as on a cluster.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from unibct_ray.checkpoint import load_checkpoint
from unibct_ray.data.shards import read_manifest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    code = load_job("prepare_ms1m").main(["--out", str(tmp / "ms1m"), "--smoke-test", "--scenario", "open-class",
                                          "--num-workers", "2"])
    assert code == 0
    return tmp


def test_prepare_smoke_writes_only_smoke_outputs(prepared):
    shards = read_manifest(prepared / "ms1m-smoke-shards")
    old = read_manifest(prepared / "ms1m-smoke-open-class" / "old")
    new = read_manifest(prepared / "ms1m-smoke-open-class" / "new")
    assert shards.classes == 20 and len(shards.shards) >= 2  # 20 identities, 40-row shards
    assert old.classes == 6 and new.classes == 14  # class-0.3 / class-0.7 of 20
    assert old.rows + new.rows == shards.rows
    assert sorted(p.name for p in prepared.iterdir()) == ["ms1m-smoke-open-class", "ms1m-smoke-shards",
                                                          "ms1m-smoke-synth"]


def test_train_then_evaluate_smoke(prepared, tmp_path, capsys):
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-old", "data": {"train": str(prepared / "ms1m-smoke-open-class" / "new"), "image_size": 32},
        "model": {"backbone": "tiny", "embedding_size": 16}, "optim": {"epochs": 20, "base_batch": 8},
        "head": {"scale": 16.0, "margin": 0.2}, "global_batch": 8, "num_workers": 1, "cpus_per_worker": 1,
        "storage": str(tmp_path / "runs"), "extract_actors": 1}))
    assert load_job("train").main(["--config", str(cfg), "--smoke-test", "--num-workers", "2"]) == 0
    # what is being prepared, before the first step (fit()'s start-up is the silent part), then the epoch
    printed = capsys.readouterr().out
    start = ("[tiny-old-smoke] epoch 1 of 1: starting 2 Ray Train workers (CPU) and the Ray Data input pipeline "
             "(4 steps of 8 images per epoch); a line follows each epoch")
    assert start in printed and printed.index(start) < printed.index("[tiny-old-smoke] epoch 1/1  loss "), printed
    run = tmp_path / "runs" / "tiny-old-smoke"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in rows] == [1]  # 1 epoch, not the config's 20
    state = load_checkpoint(run / "final.pt")
    stored = json.loads(state["config"])
    assert (stored["num_workers"], stored["name"]) == (2, "tiny-old-smoke")
    assert read_manifest(run / "data").rows == 32  # 4 global batches
    assert not (tmp_path / "runs" / "tiny-old").exists()  # the real run is untouched

    out = tmp_path / "report"
    code = load_job("evaluate").main(["--old-checkpoint", str(run / "final.pt"), "--new-checkpoint",
                                      str(run / "final.pt"), "--out", str(out), "--smoke-test", "--num-workers", "1"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out.with_name("report-smoke") / "report.json").read_text())
    assert set(rep["verification"]) == {"self_old", "self_new", "cross"}
    # the same checkpoint on both sides: cross-model scores are the self scores
    assert rep["verification"]["cross"] == rep["verification"]["self_old"]
    assert not out.exists()
