"""`unibct-ray eval` from feature files runs in process: no Ray start, no ray or torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.bench.eval import synthetic_ijbc, write_ijbc_folder
from unibct_ray.distributed.evaluate import SHARD_WORK_THRESHOLD, auto_shards

# Runs the CLI, then lists every heavy module that got imported.
_PROBE = """
import json, sys
from unibct_ray.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch", "torchvision"))
benches = sorted(m for m in sys.modules if m.startswith("unibct_ray.bench."))
print(json.dumps({"rc": rc, "heavy": heavy, "benches": benches}))
"""


def test_eval_from_features_imports_neither_ray_nor_torch(tmp_path: Path) -> None:
    meta, old, new, _ = synthetic_ijbc(0.01, seed=5, dim=8)
    root = write_ijbc_folder(meta, tmp_path / "root")
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-c", _PROBE, "eval", "--ijbc", str(root), "--old-features", str(tmp_path / "old.npy"),
           "--new-features", str(tmp_path / "new.npy"), "--out", str(tmp_path / "out"), "--bootstrap", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # No bench module is imported to build the parser of another command.
    assert res == {"rc": 0, "heavy": [], "benches": []}
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["protocol"]["shards"] == 1
    # One exact in-process shard: the 1:N scores come from the 1:1 score grid (no FAISS index),
    # and they equal a FAISS flat index's (an independent backend) on the same features.
    assert rep["protocol"]["knn"] == "brute_force (numpy, exact)"
    assert rep["protocol"]["score_grid_shared"] is True
    from unibct_ray.data.ijbc import read_ijbc_meta
    from unibct_ray.metrics.evaluate import evaluate_features
    from unibct_ray.metrics.knn import faiss_knn

    ref, _ = evaluate_features(read_ijbc_meta(root), old, new, knn=faiss_knn("flat"), bootstrap=0)
    assert ref["protocol"]["score_grid_shared"] is False
    for section in ("verification", "identification"):
        for test, values in ref[section].items():
            assert rep[section][test] == pytest.approx(values, abs=2e-3), (section, test)
    # The parsed meta was cached beside the report (OUT/cache) for the next evaluation.
    assert len(list((tmp_path / "out" / "cache").glob("ijbc-meta-*.npz"))) == 1


def test_auto_shards_threshold() -> None:
    # The real IJB-C galleries (~1.8k templates, 19,593 probes, 512-d) stay in process.
    assert auto_shards(1_772, 19_593, 512) == 1
    assert auto_shards(1_000_000, 19_593, 512) == 2
    rows = int(SHARD_WORK_THRESHOLD // (19_593 * 512))
    assert auto_shards(rows, 19_593, 512) == 1
    assert auto_shards(rows + 1, 19_593, 512) == 2


def test_feature_file_check_names_a_bad_row_past_the_first_block(tmp_path: Path) -> None:
    # The finiteness check reads the mapped file in blocks (8,192 rows at 512-d): a NaN in a
    # later block is found and named by its row in the whole file.
    from unibct_ray.distributed.evaluate import load_feature_file
    from unibct_ray.errors import DataFormatError

    feats = np.random.default_rng(0).standard_normal((20_000, 512)).astype(np.float32)
    np.save(tmp_path / "ok.npy", feats)
    loaded = load_feature_file(tmp_path / "ok.npy", 20_000, "new features")
    np.testing.assert_array_equal(loaded, feats)
    feats[17_345, 100] = np.inf
    feats[19_999, 0] = np.nan
    np.save(tmp_path / "bad.npy", feats)
    with pytest.raises(DataFormatError, match=r"bad\.npy: new features row 17345 holds NaN/inf"):
        load_feature_file(tmp_path / "bad.npy", 20_000, "new features")


_FAULTS = """
import resource, sys
import numpy as np
from unibct_ray.cli import _small_pages
_small_pages()  # as eval does: 4 KiB pages, so a fault is a page
if sys.argv[1] == "tuned":
    from unibct_ray.heap import keep_freed_memory
    assert keep_freed_memory()
elif sys.argv[1] == "embedder":  # an inference actor sets it when it builds its models
    import torch
    from unibct_ray.inference import DeviceEmbedder
    DeviceEmbedder([torch.nn.Conv2d(3, 4, 3)], use_gpu=False)
def faults_of_a_fresh_256mb_array():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(1 << 25)  # 256 MB, every page written
    n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del a
    return n
first = faults_of_a_fresh_256mb_array()
print(first, faults_of_a_fresh_256mb_array())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_eval_process_reuses_freed_blocks_instead_of_faulting_them_in_again() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    got = {}
    for mode in ("plain", "tuned", "embedder"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                             env=env, timeout=120, check=True).stdout.split()
        got[mode] = [int(x) for x in out]
    pages = (1 << 28) // 4096
    # glibc's default unmaps the freed 256 MB and the next array faults every page in again;
    # kept in the heap, the second array reuses the first one's pages.
    assert got["plain"][1] > pages // 8, got
    for mode in ("tuned", "embedder"):
        assert got[mode][0] > pages // 8 and got[mode][1] < pages // 100, got
