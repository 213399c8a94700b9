"""End to end on local Ray: old model, the four kinds of new model, refinement, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.checkpoint import load_checkpoint
from unibct_ray.cli import main
from unibct_ray.config import from_dict
from unibct_ray.distributed.train import train

pytestmark = pytest.mark.slow


def cfg_for(tmp: Path, name: str, split: str, method: str = "independent", epochs: int = 3, **compat):
    data = {
        "name": name,
        "data": {"train": str(tmp / "split" / split), "image_size": 32},
        "model": {"backbone": "tiny", "embedding_size": 32},
        "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "optim": {"lr": 0.1, "base_batch": 32, "epochs": epochs},
        "global_batch": 32, "num_workers": 2, "cpus_per_worker": 1,
        "storage": str(tmp / "runs"), "extract_actors": 1, "refine_actors": 2,
        "compat": {"method": method, **compat},
    }
    if method != "independent":
        data["compat"]["old_checkpoint"] = str(tmp / "runs" / "old" / "final.pt")
    return from_dict(data)


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def workspace(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert main(["data", "synth", "--out", str(tmp / "synth"), "--identities", "16", "--images-per-identity", "14",
                 "--count-spread", "0", "--size", "32", "--eval-identities", "0", "--strength", "0.3",
                 "--no-progress"]) == 0
    assert main(["data", "convert", "--rec", str(tmp / "synth" / "train.rec"), "--out", str(tmp / "shards"),
                 "--rows-per-shard", "64", "--no-progress"]) == 0
    assert main(["data", "split", "--src", str(tmp / "shards"), "--scenario", "extended-class", "--ratio", "0.5",
                 "--out", str(tmp / "split"), "--no-progress"]) == 0
    res = train(cfg_for(tmp, "old", "old", epochs=3))
    m = read_metrics(res.run_dir)
    assert len(m) == 3 and m[-1]["loss"] < m[0]["loss"]
    return tmp


@pytest.mark.parametrize("method,extra", [
    ("independent", {}),
    ("l2", {"weight": 10.0}),
    ("bct", {"weight": 1.0}),
    ("unibct", {"weight": 1.0, "refine_epochs": [1]}),
])
def test_new_model_methods(workspace, method, extra):
    res = train(cfg_for(workspace, f"new-{method}", "new", method, **extra))
    m = read_metrics(res.run_dir)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[-1]["head_loss"] < m[0]["head_loss"]  # it learns
    state = load_checkpoint(res.checkpoint)
    assert state["epoch"] == 3
    if method == "independent":
        assert all(r["compat_weight"] == 0 for r in m)
    elif method == "unibct":
        assert [r["compat_weight"] for r in m] == [0.0, 1.0, 1.0]  # w switched on at refinement
        assert m[1]["compat_loss"] > 0
        protos = np.load(res.run_dir / "prototypes-epoch001.npy")
        assert protos.shape == (16, 32)  # extended-class: the new set has all 16 classes
        np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-4)
        assert (res.run_dir / "new_features-epoch001" / "manifest.json").exists()
        assert state["prototypes"] is not None
    else:
        assert all(r["compat_loss"] > 0 for r in m)
    if method == "bct":
        # extended-class: classes the old model knows take its centres (matched by source_label)
        protos = np.load(res.run_dir / "prototypes-epoch000.npy")
        old = load_checkpoint(workspace / "runs" / "old" / "final.pt")["head"]["weight"].numpy()
        old_n = old / np.linalg.norm(old, axis=1, keepdims=True)
        np.testing.assert_allclose(protos[:8], old_n[:8], atol=1e-5)


def test_resume_after_interruption(workspace):
    run = workspace / "runs" / "new-independent"  # finished by the test above
    cfg = cfg_for(workspace, "new-independent", "new")
    # drop the last epoch's checkpoint, as if the job died during epoch 3
    metas = [m for m in run.rglob("meta.json") if json.loads(m.read_text())["epoch"] == 3]
    assert metas
    for meta in metas:
        shutil.rmtree(meta.parent)
    (run / "final.pt").unlink()
    res = train(cfg, resume=run)
    assert load_checkpoint(res.checkpoint)["epoch"] == 3
    epochs = [r["epoch"] for r in read_metrics(run)]
    assert epochs == [1, 2, 3, 3]  # epoch 3 ran again, epochs 1-2 did not
