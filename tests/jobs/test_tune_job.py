"""jobs/tune.py: the Ray-conventional flags and what they become (no Ray started here).

The job's command lines are parsed again by the real ``unibct-ray`` parser and its tune files
loaded by the real loader, so a translation the CLI would read differently fails here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unibct_ray.cli import build_parser as cli_parser
from unibct_ray.data.shards import read_manifest, shard_name, write_manifest, write_shard
from unibct_ray.tuning import load_tune_spec

ROOT = Path(__file__).resolve().parents[2]
RAY_FLAGS = ("--config", "--address", "--num-workers", "--use-gpu", "--smoke-test")


def load_job():
    spec = importlib.util.spec_from_file_location("job_tune", ROOT / "jobs" / "tune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tune_job = load_job()


def make_shards(path: Path, sizes: list[int], rows_per_shard: int = 7) -> pa.Table:
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    table = pa.table({"image": [b"\xff\xd8img%d" % i for i in range(len(labels))], "label": labels,
                      "index": np.arange(1, len(labels) + 1, dtype=np.int64)})
    path.mkdir(parents=True)
    infos = [write_shard(path / shard_name(i), table.slice(s, rows_per_shard))
             for i, s in enumerate(range(0, len(labels), rows_per_shard))]
    write_manifest(path, infos, rows=len(labels), classes=len(sizes), columns=table.column_names)
    return table


def write_files(tmp: Path, method: str = "unibct") -> Path:
    base = {"name": "toy", "data": {"train": str(tmp / "shards"), "image_size": 32},
            "model": {"backbone": "tiny", "embedding_size": 16}, "optim": {"epochs": 12, "base_batch": 8},
            "global_batch": 8, "num_workers": 2, "storage": str(tmp / "runs"),
            "compat": {"method": method, "refine_epochs": [4, 8], "old_checkpoint": str(tmp / "old.pt")}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    tune = {"name": "sweep", "storage": str(tmp / "tune"), "base": "base.yaml", "validation": str(tmp / "val"),
            "far": 1e-3, "asha": {"grace_period": 4},
            "space": {"compat.weight": {"loguniform": [0.3, 3.0]}, "optim.epochs": {"int": [10, 12]},
                      "compat.refine_epochs": {"choice": [[4, 8], [6]]}}}
    p = tmp / "tune.yaml"
    p.write_text(yaml.safe_dump(tune))
    return p


def test_help_explains_the_ray_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in (*RAY_FLAGS, "--num-samples", "--resume"):
        assert flag in proc.stdout, flag
    assert "--smoke-test" in proc.stdout.split("options:")[0]


def test_flags_become_tune_arguments(tmp_path):
    cfg = write_files(tmp_path)
    a = tune_job.build_parser().parse_args(["--config", str(cfg), "--num-samples", "8", "--address", "10.0.0.1:6379",
                                            "--num-workers", "4", "--no-use-gpu", "--max-concurrent", "2",
                                            "--objective", "cross", "--set", "optim.lr=0.05"])
    argv = tune_job.cli_argv(a)
    assert argv == ["tune", "--config", str(cfg), "--num-samples", "8", "--max-concurrent", "2", "--objective", "cross",
                    "--set", "optim.lr=0.05", "--set", "num_workers=4", "--set", "use_gpu=false",
                    "--address", "10.0.0.1:6379"]
    ns = cli_parser().parse_args(argv)
    spec = load_tune_spec(ns.config, objective=ns.objective, max_concurrent=ns.max_concurrent, sets=ns.set)
    trial = spec.train_config({"compat.weight": 2.0}, name="t")
    assert (trial.num_workers, trial.use_gpu, trial.optim.lr, trial.compat.weight) == (4, False, 0.05, 2.0)
    assert (spec.max_concurrent, ns.num_samples) == (2, 8)

    a = tune_job.build_parser().parse_args(["--resume", str(tmp_path / "tune" / "sweep")])
    assert tune_job.cli_argv(a) == ["tune", "--resume", str(tmp_path / "tune" / "sweep")]
    assert tune_job.load_job_config(cfg).name == "sweep"


def test_num_workers_must_divide_the_batch(tmp_path, capsys):
    code = tune_job.main(["--config", str(write_files(tmp_path)), "--num-samples", "2", "--num-workers", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "global_batch" in err and len(err.strip().splitlines()) == 1  # before any Ray starts


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        tune_job.main(["--config", "x.yaml"])
    assert "--num-samples are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_job.main(["--config", "x.yaml", "--smoke-test", "--resume", "runs/x"])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_job.main(["--smoke-test"])
    assert "--smoke-test needs --config" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["unibct", "l2"])
def test_smoke_sweep_is_small_and_separate(tmp_path, method):
    src = make_shards(tmp_path / "shards", [5, 9, 3, 12, 6, 8])
    cfg = write_files(tmp_path, method)
    stale = tmp_path / "tune" / "sweep-smoke" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from the previous smoke sweep")
    a = tune_job.build_parser().parse_args(["--config", str(cfg), "--smoke-test", "--num-workers", "1"])
    path = tune_job.prepare_smoke(a)
    exp = tmp_path / "tune" / "sweep-smoke"
    assert not stale.exists() and path.parent == exp
    m = read_manifest(exp / "data")
    got = pa.concat_tables([pq.read_table(f) for f in m.files])
    assert m.rows == 32 and got.equals(src.slice(0, 32))  # 4 global batches of 8

    argv = tune_job.cli_argv(a, path, tune_job.SMOKE_SAMPLES)
    assert argv[-4:] == ["--max-concurrent", "1", "--set", "num_workers=1"]
    ns = cli_parser().parse_args(argv)
    spec = load_tune_spec(ns.config, max_concurrent=ns.max_concurrent, sets=ns.set)
    assert spec.name == "sweep-smoke" and spec.experiment_dir == exp and ns.num_samples == 2
    assert [p.key for p in spec.space] == ["compat.weight"] and spec.asha is None
    trial = spec.train_config({"compat.weight": 1.0}, name="t")
    assert Path(trial.data.train) == exp / "data" and trial.num_workers == 1
    if method == "unibct":
        assert (trial.optim.epochs, trial.compat.refine_epochs) == (2, (1,))
    else:
        assert trial.optim.epochs == 1
    assert (tmp_path / "tune" / "sweep").exists() is False  # the real experiment is never touched
