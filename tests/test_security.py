"""Security: hostile pickles run nothing, every loader is safe, nothing is overwritten silently.

A hostile file here is one whose unpickling would create a marker file (a stand-in for
arbitrary code). A first test proves the payload is real: a plain ``torch.load`` /
``pickle.load`` runs it. Then every entry point that reads a checkpoint or an array refuses
the file with one clear line, and the marker never appears.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from unibct_ray.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from unibct_ray.cli import main
from unibct_ray.errors import DataFormatError
from unibct_ray.tune_signature import sign_files

ROOT = Path(__file__).resolve().parent.parent


class WritesFile:
    """Unpickling runs ``open(path, 'w')``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    """Unpickling runs ``os.system('touch path')``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def hostile_checkpoints(d: Path, marker: Path) -> dict[str, Path]:
    """Payloads at the top level, inside the weights, inside the optimizer state."""
    weights = {"w": torch.zeros(2)}
    files = {
        "top-level": RunsShell(marker),
        "in-weights": {"format": FORMAT, "model": {**weights, "evil": WritesFile(marker)}},
        "in-optimizer": {"format": FORMAT, "model": weights, "optimizer": {"state": {0: RunsShell(marker)}}},
    }
    out = {}
    for name, obj in files.items():
        torch.save(obj, d / f"{name}.pt")
        out[name] = d / f"{name}.pt"
    return out


def test_the_payloads_are_real(tmp_path):
    marker = tmp_path / "ran"
    for path in hostile_checkpoints(tmp_path, marker).values():
        torch.load(path, weights_only=False)  # what an unsafe loader would do
        assert marker.exists()
        marker.unlink()
    np.save(tmp_path / "o.npy", np.array([WritesFile(marker)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "o.npy", allow_pickle=True)
    assert marker.exists()


def test_load_checkpoint_refuses_hostile_pickles(tmp_path):
    marker = tmp_path / "ran"
    for name, path in hostile_checkpoints(tmp_path, marker).items():
        with pytest.raises(DataFormatError, match="refused to load.*could run code") as e:
            load_checkpoint(path)
        assert str(path) in str(e.value), name
        assert not marker.exists(), name


def test_resume_refuses_a_hostile_checkpoint(tmp_path, capsys):
    """``train --resume`` finds the newest checkpoint of a run and loads it safely."""
    marker = tmp_path / "ran"
    run = tmp_path / "run" / "epochs-000-002" / "checkpoint_1"
    run.mkdir(parents=True)
    torch.save({"format": FORMAT, "config": "{}", "epoch": 1, "model": WritesFile(marker)}, run / "checkpoint.pt")
    (run / "meta.json").write_text(json.dumps({"epoch": 1}))
    (tmp_path / "train.yaml").write_text("name: x\n")
    code = main(["train", "--config", str(tmp_path / "train.yaml"), "--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint.pt: refused to load" in err[0], err
    assert not marker.exists()


def test_tune_resume_refuses_a_tampered_tuner_pickle(tmp_path, capsys):
    """``tune --resume`` checks the sweep's signature before Ray Tune unpickles its state (the
    real sweep, killed, resumed and tampered with: ``tests/distributed/test_tune.py``)."""
    marker = tmp_path / "ran"
    exp = tmp_path / "sweep"
    (exp / "trials").mkdir(parents=True)
    (exp / "tune-spec.json").write_text("{}\n")
    (exp / "trials" / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    sign_files(exp, {"tune-spec.json": exp / "tune-spec.json", "trials/tuner.pkl": exp / "trials" / "tuner.pkl"})
    (exp / "trials" / "tuner.pkl").write_bytes(pickle.dumps(WritesFile(marker)))
    code = main(["tune", "--resume", str(exp)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{exp / 'trials' / 'tuner.pkl'}: changed since the sweep signed it" in err[0]
    assert not marker.exists()


def test_prototypes_refuses_pickled_arrays(tmp_path, capsys):
    marker = tmp_path / "ran"
    np.save(tmp_path / "o.npy", np.array([WritesFile(marker)] * 4, dtype=object), allow_pickle=True)
    np.save(tmp_path / "l.npy", np.arange(4))
    code = main(["prototypes", "--old-features", str(tmp_path / "o.npy"), "--labels", str(tmp_path / "l.npy"),
                 "--out", str(tmp_path / "p.npy"), "--no-refine"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "o.npy: refused to load" in err[0], err
    assert not marker.exists() and not (tmp_path / "p.npy").exists()


# ----------------------------------------------------------------------------- every loader is safe
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_every_loader_in_the_code_is_safe():
    """torch.load with weights_only=True, np.load with allow_pickle=False, yaml through a
    SafeLoader, and no pickle/joblib/marshal loads at all (package and jobs/)."""
    checked = 0
    for path in sorted([*ROOT.glob("unibct_ray/**/*.py"), *ROOT.glob("jobs/**/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for name, kw, node in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "torch.load":
                checked += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            elif name in ("np.load", "numpy.load"):
                checked += 1
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            elif name == "yaml.load":
                checked += 1
                loader = kw.get("Loader")
                assert isinstance(loader, ast.Name), where
                import yaml

                module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
                assert issubclass(getattr(module, loader.id), yaml.SafeLoader), where
            assert name not in ("pickle.load", "pickle.loads", "joblib.load", "marshal.load", "marshal.loads",
                                "cloudpickle.load", "cloudpickle.loads", "yaml.unsafe_load", "yaml.full_load"), where
    assert checked >= 5  # the scan saw the loaders it is meant to check


# ----------------------------------------------------------------------------- no silent overwrite
def digest(path: Path) -> dict[str, tuple[str, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def _shards(d: Path) -> Path:
    import pyarrow as pa

    from unibct_ray.data.shards import SHARD_SCHEMA, write_manifest, write_shard

    src = d / "shards"
    src.mkdir()
    labels = np.repeat(np.arange(4), 3)
    info = write_shard(src / "part-00000.parquet", pa.table(
        {"image": [b"\xff\xd8\xff" + bytes([i]) for i in range(12)], "label": labels,
         "index": np.arange(1, 13)}, schema=SHARD_SCHEMA))
    write_manifest(src, [info], rows=12, classes=4, columns=["image", "label", "index"])
    return src


def _prototypes_case(d: Path):
    rng = np.random.default_rng(0)
    np.save(d / "o.npy", rng.standard_normal((12, 4)).astype(np.float32))
    np.save(d / "l.npy", np.repeat(np.arange(3), 4))
    out = d / "p.npy"
    np.save(out, np.zeros((3, 4), np.float32))
    return ["prototypes", "--old-features", str(d / "o.npy"), "--labels", str(d / "l.npy"), "--out", str(out),
            "--no-refine"], out


def _split_case(d: Path):
    out = d / "split"
    (out / "old").mkdir(parents=True)
    (out / "old" / "mine.txt").write_text("keep me")
    return ["data", "split", "--src", str(_shards(d)), "--scenario", "open-class", "--ratio", "0.5",
            "--out", str(out), "--no-progress"], out


def _eval_case(d: Path):
    from unibct_ray.data import ijbc, ijbc_writers

    meta = d / "ijbc" / "IJBC" / "meta"
    names = [f"{i}.jpg" for i in range(8)]
    templates = np.array([1, 2, 3, 4, 11, 12, 13, 14])
    ijbc_writers.write_tid_mid(meta / ijbc.TID_MID_FILE, names, templates, templates)
    ijbc_writers.write_5pts_score(meta / ijbc.NAME_5PTS_FILE, names, np.zeros((8, 5, 2), np.float32), np.ones(8, np.float32))
    ijbc_writers.write_pair_label(meta / ijbc.PAIR_LABEL_FILE, np.array([[1, 11], [2, 12], [1, 13], [3, 14]]),
                          np.array([1, 1, 0, 0]))
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY1_FILE, np.array([1, 2]), np.array([0, 1]), names[:2])
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY2_FILE, np.array([3, 4]), np.array([2, 3]), names[2:4])
    ijbc_writers.write_1n_csv(meta / ijbc.PROBE_FILE, np.array([11, 12, 13, 14]), np.arange(4), names[4:])
    np.save(d / "f.npy", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    out = d / "report"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}\n')
    return ["eval", "--ijbc", str(d / "ijbc"), "--old-features", str(d / "f.npy"), "--out", str(out),
            "--bootstrap", "0", "--shards", "1"], out


def _synth_case(d: Path):
    out = d / "synth"
    out.mkdir()
    (out / "train.rec").write_bytes(b"mine")
    return ["data", "synth", "--out", str(out), "--identities", "2", "--images-per-identity", "2", "--size", "32",
            "--eval-identities", "0", "--no-progress"], out


@pytest.mark.parametrize("build", [_prototypes_case, _split_case, _eval_case, _synth_case],
                         ids=["prototypes", "data-split", "eval-report", "data-synth"])
def test_existing_outputs_need_overwrite(build, tmp_path, capsys, ray_session):
    argv, out = build(tmp_path)
    before = digest(out)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(out) in err[0] and "already exists (pass --overwrite" in err[0], err
    assert digest(out) == before  # untouched, bytes and mtime
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert digest(out) != before


def test_train_refuses_to_reuse_a_run_directory(tmp_path, capsys, ray_session):
    src = _shards(tmp_path)
    run = tmp_path / "runs" / "x" / "epochs-000-001" / "checkpoint_1"
    run.mkdir(parents=True)
    save_checkpoint(run / "checkpoint.pt", {"epoch": 1})
    (run / "meta.json").write_text('{"epoch": 1}')
    (tmp_path / "train.yaml").write_text(f"name: x\nstorage: {tmp_path / 'runs'}\ndata:\n  train: {src}\n"
                                         "global_batch: 4\nnum_workers: 1\n")
    before = digest(tmp_path / "runs")
    code = main(["train", "--config", str(tmp_path / "train.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a run with checkpoints already exists" in err[0], err
    assert digest(tmp_path / "runs") == before


def test_cached_eval_features_are_reused_not_replaced(tmp_path):
    """A feature cache that does not fit is an error, not silently recomputed over."""
    from unibct_ray.distributed.evaluate import _cached

    cache = tmp_path / "features-x.npy"
    np.save(cache, np.ones((5, 4), np.float32))
    before = digest(cache)
    np.testing.assert_array_equal(_cached(cache, 5, overwrite=False), np.ones((5, 4)))
    with pytest.raises(DataFormatError, match="do not fit these 7 IJB-C images.*--overwrite"):
        _cached(cache, 7, overwrite=False)
    assert _cached(cache, 7, overwrite=True) is None  # --overwrite: recompute (then replace atomically)
    assert digest(cache) == before
