"""jobs/*.py: the Ray-conventional flags and what they become (no Ray started here).

Each job's command lines are parsed again by the real ``unibct-ray`` parser and its configs
loaded by the real loader, so a translation that the CLI would read differently fails here.
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
from unibct_ray.config import load_config
from unibct_ray.data.shards import read_manifest, shard_name, write_manifest, write_shard
from unibct_ray.errors import ConfigError, UserError
from unibct_ray.jobs import SCENARIOS, load_prepare_config

ROOT = Path(__file__).resolve().parents[2]
JOBS = ("train", "evaluate", "prepare_ms1m")
RAY_FLAGS = ("--config", "--address", "--num-workers", "--use-gpu", "--smoke-test")


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_job, eval_job, prep_job = (load_job(n) for n in JOBS)


def make_shards(path: Path, sizes: list[int], rows_per_shard: int = 7, seed: int | None = None) -> pa.Table:
    """A shard set in class order, or rows permuted with ``seed`` as ``data convert`` writes them
    (image bytes are placeholders: nothing here decodes them)."""
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    if seed is not None:
        labels = np.random.default_rng(seed).permutation(labels)
    table = pa.table({"image": [b"\xff\xd8img%d" % i for i in range(len(labels))], "label": labels,
                      "index": np.arange(1, len(labels) + 1, dtype=np.int64),
                      "source_label": labels + 100})
    path.mkdir(parents=True)
    infos = [write_shard(path / shard_name(i), table.slice(s, rows_per_shard))
             for i, s in enumerate(range(0, len(labels), rows_per_shard))]
    write_manifest(path, infos, rows=len(labels), classes=len(sizes), columns=table.column_names)
    return table


def write_cfg(tmp: Path, method: str = "independent", **extra) -> Path:
    data = {"name": "toy", "data": {"train": str(tmp / "shards"), "image_size": 32},
            "model": {"backbone": "tiny", "embedding_size": 16}, "optim": {"epochs": 5, "base_batch": 8},
            "global_batch": 8, "num_workers": 2, "storage": str(tmp / "runs"),
            "compat": {"method": method, "refine_epochs": [2, 3], **extra}}
    p = tmp / f"{method}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# ------------------------------------------------------------------ all jobs
@pytest.mark.parametrize("name", JOBS)
def test_help_explains_the_ray_flags(name):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in RAY_FLAGS:
        assert flag in proc.stdout, (name, flag)
    assert "--smoke-test" in proc.stdout.split("options:")[0]  # the description says what a smoke test does


@pytest.mark.parametrize("name", JOBS)
def test_bad_num_workers_is_a_usage_error(name, capsys):
    with pytest.raises(SystemExit) as e:
        load_job(name).main(["--config", "x.yaml", "--num-workers", "0"])
    assert e.value.code == 2
    assert "--num-workers" in capsys.readouterr().err


# ------------------------------------------------------------------ train
def test_train_flags_become_config_overrides(tmp_path):
    cfg_path = ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml"  # num_workers 8, use_gpu true
    a = train_job.build_parser().parse_args(["--config", str(cfg_path), "--address", "10.0.0.1:6379",
                                             "--num-workers", "4", "--no-use-gpu", "--set", "optim.lr=0.05"])
    argv = train_job.cli_argv(a)
    assert argv == ["train", "--config", str(cfg_path), "--set", "optim.lr=0.05", "--set", "num_workers=4",
                    "--set", "use_gpu=false", "--address", "10.0.0.1:6379"]
    ns = cli_parser().parse_args(argv)
    assert ns.address == "10.0.0.1:6379" and ns.resume is None
    cfg = load_config(ns.config, ns.set)
    assert (cfg.num_workers, cfg.use_gpu, cfg.optim.lr, cfg.per_worker_batch) == (4, False, 0.05, 256)

    a = train_job.build_parser().parse_args(["--config", str(ROOT / "jobs/configs/synthetic/old.yaml"),
                                             "--use-gpu"])
    assert load_config(a.config, train_job.overrides(a)).use_gpu is True
    a = train_job.build_parser().parse_args(["--config", str(cfg_path)])
    assert train_job.overrides(a) == [] and train_job.cli_argv(a) == ["train", "--config", str(cfg_path)]


def test_train_num_workers_must_divide_the_batch(capsys):
    code = train_job.main(["--config", str(ROOT / "jobs/configs/synthetic/old.yaml"), "--num-workers", "3"])
    assert code == 2
    assert "global_batch" in capsys.readouterr().err  # config error before any Ray starts


def test_train_usage_errors(capsys):
    with pytest.raises(SystemExit):
        train_job.main(["--num-workers", "2"])
    assert "--config is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_job.main(["--config", "x.yaml", "--smoke-test", "--resume", "runs/x"])
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["independent", "unibct"])
def test_train_smoke_takes_the_first_batches(tmp_path, method):
    src = make_shards(tmp_path / "shards", [5, 9, 3, 12, 6, 8])  # 43 rows over 7-row shards
    old_ckpt = tmp_path / "old.pt"
    old_ckpt.write_bytes(b"placeholder")  # only its existence is checked before the run
    extra = {"old_checkpoint": str(old_ckpt)} if method != "independent" else {}
    cfg_path = write_cfg(tmp_path, method, **extra)
    stale = tmp_path / "runs" / "toy-smoke" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from the previous smoke run")

    a = train_job.build_parser().parse_args(["--config", str(cfg_path), "--smoke-test", "--set", "global_batch=6",
                                             "--num-workers", "3"])
    sets = train_job.prepare_smoke(a)
    run = tmp_path / "runs" / "toy-smoke"
    assert not stale.exists()
    m = read_manifest(run / "data")
    got = pa.concat_tables([pq.read_table(f) for f in m.files])
    assert m.rows == 24 == got.num_rows  # 4 global batches of 6
    assert got.equals(src.slice(0, 24))  # the first rows, every column, in order
    assert m.classes == 4  # classes 0..3 (class 3 partly)

    argv = train_job.cli_argv(a, sets)
    ns = cli_parser().parse_args(argv)
    cfg = load_config(ns.config, ns.set)
    assert cfg.name == "toy-smoke" and Path(cfg.data.train) == run / "data"
    assert (cfg.num_workers, cfg.global_batch) == (3, 6)
    if method == "unibct":
        assert (cfg.optim.epochs, cfg.compat.refine_epochs) == (2, (1,))
    else:
        assert cfg.optim.epochs == 1


def test_train_smoke_renumbers_the_classes_of_a_class_mixed_set(tmp_path):
    src = make_shards(tmp_path / "shards", [5, 9, 3, 12, 6, 8, 4, 7], seed=3)  # rows mixed, as data convert writes
    cfg_path = write_cfg(tmp_path)
    a = train_job.build_parser().parse_args(["--config", str(cfg_path), "--smoke-test", "--set", "global_batch=4",
                                             "--num-workers", "2"])
    train_job.prepare_smoke(a)
    m = read_manifest(tmp_path / "runs" / "toy-smoke" / "data")
    got = pa.concat_tables([pq.read_table(f) for f in m.files])
    first = src.slice(0, 16)
    seen = sorted(set(first.column("label").to_pylist()))
    assert len(seen) < 8  # the sample misses a class, so ids must be renumbered
    assert m.classes == len(seen)
    assert got.column("label").to_pylist() == [seen.index(x) for x in first.column("label").to_pylist()]
    for col in ("image", "index", "source_label"):  # everything else is the first rows unchanged
        assert got.column(col).equals(first.column(col))


def test_train_smoke_needs_the_old_checkpoint(tmp_path):
    make_shards(tmp_path / "shards", [4, 4])
    cfg_path = write_cfg(tmp_path, "l2", old_checkpoint=str(tmp_path / "missing.pt"))
    a = train_job.build_parser().parse_args(["--config", str(cfg_path), "--smoke-test"])
    with pytest.raises(UserError, match="missing.pt does not exist yet"):
        train_job.prepare_smoke(a)


# ------------------------------------------------------------------ evaluate
def test_evaluate_paths_from_the_new_model_config(tmp_path):
    old = tmp_path / "old.pt"
    cfg_path = write_cfg(tmp_path, "bct", old_checkpoint=str(old))
    a, rest = eval_job.build_parser().parse_known_args(["--config", str(cfg_path), "--ijbc", "/data/ijb"])
    with pytest.raises(UserError, match="train .* first"):
        eval_job.resolve(a)  # the new model's final.pt does not exist yet
    new = tmp_path / "runs" / "toy" / "final.pt"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"x")
    assert eval_job.resolve(a) == (old, new, tmp_path / "runs" / "toy" / "ijbc-report")

    a, rest = eval_job.build_parser().parse_known_args(
        ["--config", str(cfg_path), "--ijbc", "/data/ijb", "--out", "/r/x", "--num-workers", "6",
         "--address", "h:6379", "--shards", "4", "--bootstrap", "50"])
    (step,) = eval_job.cli_steps(a, rest, *eval_job.resolve(a))
    ns = cli_parser().parse_args(step)
    assert ns.command == "eval"
    assert (ns.ijbc, ns.old_checkpoint, ns.new_checkpoint, ns.out) == (Path("/data/ijb"), old, new, Path("/r/x"))
    assert (ns.actors, ns.shards, ns.bootstrap, ns.address) == (6, 4, 50, "h:6379")
    assert not ns.use_gpu


def test_evaluate_use_gpu_reaches_the_eval_command():
    a, rest = eval_job.build_parser().parse_known_args(
        ["--ijbc", "i", "--old-checkpoint", "o.pt", "--new-checkpoint", "n.pt", "--out", "r", "--use-gpu",
         "--gpus-per-actor", "0.25", "--batch-size", "512"])
    (step,) = eval_job.cli_steps(a, rest, *eval_job.resolve(a))
    ns = cli_parser().parse_args(step)
    assert (ns.use_gpu, ns.gpus_per_actor, ns.batch_size) == (True, 0.25, 512)


def test_evaluate_without_config_needs_both_checkpoints(tmp_path):
    a, _ = eval_job.build_parser().parse_known_args(["--ijbc", "i", "--old-checkpoint", "o.pt", "--out", "r"])
    with pytest.raises(UserError, match="--new-checkpoint"):
        eval_job.resolve(a)
    indep = write_cfg(tmp_path, "independent")  # no old model named in the config
    a, _ = eval_job.build_parser().parse_known_args(["--config", str(indep), "--ijbc", "i"])
    with pytest.raises(UserError, match="--old-checkpoint"):
        eval_job.resolve(a)


def test_evaluate_smoke_renders_a_tiny_ijbc(tmp_path):
    a, rest = eval_job.build_parser().parse_known_args(
        ["--old-checkpoint", "o.pt", "--new-checkpoint", "n.pt", "--out", str(tmp_path / "rep"), "--smoke-test"])
    synth, ev = eval_job.cli_steps(a, rest, *eval_job.resolve(a))
    s, e = cli_parser().parse_args(synth), cli_parser().parse_args(ev)
    assert (s.command, s.data_command) == ("data", "synth")
    assert s.out == tmp_path / "rep-smoke" / "ijbc" and s.eval_identities == 8 and s.overwrite
    assert e.ijbc == s.out and e.out == tmp_path / "rep-smoke" and e.bootstrap == 0
    assert (e.old_checkpoint, e.new_checkpoint) == (Path("o.pt"), Path("n.pt"))


@pytest.mark.parametrize("argv,message", [
    (["--ijbc", "i", "--actors", "3"], "--num-workers sets the extraction actors"),
    (["--old-checkpoint", "o.pt"], "--ijbc is required"),
])
def test_evaluate_refuses_flags_that_do_not_apply(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        eval_job.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ prepare_ms1m
def test_prepare_config_matches_the_training_configs():
    """prepare.yaml writes exactly the data.train directories the MS1Mv3 configs read."""
    prep = load_prepare_config(ROOT / "jobs/configs/ms1mv3/prepare.yaml")
    assert set(prep.scenarios) == set(SCENARIOS) and prep.ratio == 0.3
    seen = 0
    for scenario in SCENARIOS:
        d = ROOT / "jobs/configs/ms1mv3" / scenario
        for f in [d / "old.yaml", *sorted(d.glob("new-*.yaml"))]:  # the training configs
            cfg = load_config(f)
            side = "old" if f.stem == "old" else "new"
            assert cfg.data.train == f"{prep.out}-{scenario}/{side}", f
            seen += 1
    # old + every method per scenario: independent l2 l2-weak bct unibct nccl advbct mixbct
    assert seen == 4 * (1 + 8)


def test_prepare_steps_skip_complete_outputs(tmp_path):
    out = tmp_path / "ms1m"
    a = prep_job.build_parser().parse_args(["--config", str(ROOT / "jobs/configs/ms1mv3/prepare.yaml"), "--out",
                                            str(out), "--num-workers", "16", "--address", "h:6379"])
    cfg = prep_job.settings(a)
    assert cfg.rec == "/data/ms1m-retinaface-t1/train.rec" and cfg.out == str(out)
    steps = [cli_parser().parse_args(s) for s in prep_job.cli_steps(a, cfg)]
    assert [s.data_command for s in steps] == ["convert"] + ["split"] * 4
    assert steps[0].rec == Path(cfg.rec) and steps[0].out == Path(f"{out}-shards")
    assert (steps[0].parallelism, steps[0].address, steps[0].rows_per_shard) == (16, "h:6379", 50_000)
    assert [s.scenario for s in steps[1:]] == list(SCENARIOS)
    assert all(s.src == Path(f"{out}-shards") and s.out == Path(f"{out}-{s.scenario}") and s.ratio == 0.3
               for s in steps[1:])

    for done in (f"{out}-shards", f"{out}-open-data"):
        Path(done).mkdir()
        (Path(done) / "manifest.json").write_text("{}")
    steps = [cli_parser().parse_args(s) for s in prep_job.cli_steps(a, cfg)]
    assert [s.scenario for s in steps] == ["extended-data", "extended-class", "open-class"]


def test_prepare_smoke_uses_its_own_outputs(tmp_path):
    out = tmp_path / "ms1m"
    (tmp_path / "ms1m-shards").mkdir()
    (tmp_path / "ms1m-shards" / "manifest.json").write_text("{}")  # the real set: left alone
    a = prep_job.build_parser().parse_args(["--out", str(out), "--smoke-test", "--scenario", "open-class"])
    steps = [cli_parser().parse_args(s) for s in prep_job.cli_steps(a, prep_job.settings(a))]
    assert [(s.command, getattr(s, "data_command", None)) for s in steps] == [
        ("data", "synth"), ("data", "convert"), ("data", "split")]
    assert steps[0].out == Path(f"{out}-smoke-synth") and steps[0].eval_identities == 0
    assert steps[1].rec == Path(f"{out}-smoke-synth/train.rec") and steps[1].out == Path(f"{out}-smoke-shards")
    assert steps[2].out == Path(f"{out}-smoke-open-class") and steps[2].scenario == "open-class"
    assert all(s.overwrite for s in steps)


@pytest.mark.parametrize("text,message", [
    ("rec: a.rec\nout: o\nratio: 0.3\nshards: 5\n", "shards: unknown key"),
    ("rec: a.rec\nout: o\nratio: high\n", "ratio: expected a number"),
    ("rec: a.rec\nout: o\nscenarios: [open-class, closed-class]\n", "'closed-class' is not one of"),
    ("rec: a.rec\nout: o\nratio: 1.5\n", "ratio: must be in (0, 1)"),
])
def test_prepare_config_is_strict(tmp_path, text, message):
    p = tmp_path / "prep.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_prepare_config(p)
    assert message in str(e.value) and "prep.yaml" in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--out", "o", "--rec", "r.rec", "--use-gpu"], "no GPU work"),
    (["--rec", "r.rec"], "--out (or out: in --config) is required"),
    (["--out", "o"], "--rec (or rec: in --config) is required"),
])
def test_prepare_refuses_what_does_not_apply(argv, message, capsys):
    try:
        code = prep_job.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
