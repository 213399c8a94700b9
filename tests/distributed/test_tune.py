"""`unibct-ray tune` on the session's Ray: a real two-trial sweep whose driver is killed with
SIGKILL after the first trial finished, then resumed with `--resume DIR`; its signed Ray Tune
state then refuses a tampered ``tuner.pkl``.

The sweep runs in subprocesses connected to this session's Ray (``--address``), so killing its
driver leaves the test's own Ray alone (Ray ends the dead driver's trial actors and their Train
workers). Each trial trains a tiny l2 model for one epoch and is evaluated on a validation
IJB-C whose identities come from another synthetic world (seed 1) than the training set.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from unibct_ray.cli import main
from unibct_ray.config import load_config
from unibct_ray.tune_signature import SIGNATURE_FILE, tune_state_files, verify_experiment

TIMEOUT_S = 600.0
NUM_SAMPLES = 2


def make_old_checkpoint(path: Path) -> Path:
    """An (untrained, seeded) old model in the training checkpoint format: what the sweep
    compares against does not need to be good to test the sweep."""
    import torch

    from unibct_ray.checkpoint import save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(7)
    cfg = from_dict({"model": {"backbone": "tiny", "embedding_size": 16}, "data": {"image_size": 32}})
    return save_checkpoint(path, {"config": json.dumps(to_dict(cfg)), "epoch": 1, "step": 1,
                                  "model": build_backbone("tiny", 16, 32).state_dict()})


@pytest.fixture(scope="module")
def sweep_inputs(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    assert main(["data", "synth", "--out", str(tmp / "synth"), "--identities", "8", "--images-per-identity", "8",
                 "--count-spread", "0", "--size", "32", "--eval-identities", "0", "--strength", "0.3",
                 "--no-progress"]) == 0
    # held-out identities: world seed 1 draws other faces than the training set's world 0
    assert main(["data", "synth", "--out", str(tmp / "val"), "--seed", "1", "--identities", "1",
                 "--images-per-identity", "1", "--size", "32", "--eval-identities", "16", "--probes-per-identity",
                 "2", "--impostor-pairs", "480", "--strength", "0.3", "--no-progress"]) == 0
    assert main(["data", "convert", "--rec", str(tmp / "synth" / "train.rec"), "--out", str(tmp / "shards"),
                 "--no-progress"]) == 0
    base = {
        "name": "new-l2", "data": {"train": str(tmp / "shards"), "image_size": 32},
        "model": {"backbone": "tiny", "embedding_size": 16}, "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "optim": {"lr": 0.1, "base_batch": 32, "epochs": 1}, "global_batch": 32, "num_workers": 1,
        "cpus_per_worker": 1, "storage": str(tmp / "runs"), "extract_actors": 1,
        "compat": {"method": "l2", "old_checkpoint": str(make_old_checkpoint(tmp / "old.pt"))},
    }
    (tmp / "new-l2.yaml").write_text(yaml.safe_dump(base))
    tune = {"name": "sweep", "storage": str(tmp / "tune"), "base": "new-l2.yaml", "validation": str(tmp / "val"),
            "far": 1e-2, "objective": "pareto", "max_concurrent": 1, "seed": 0, "eval_actors": 1,
            "space": {"compat.weight": {"loguniform": [1.0, 20.0]}, "compat.l2_margin": {"choice": [0.0, 0.2]}}}
    (tmp / "tune.yaml").write_text(yaml.safe_dump(tune))
    return tmp


def tune_cli(ray_session, *args: str) -> subprocess.Popen:
    address = ray_session.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "unibct_ray.cli", "tune", *args, "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_trial_progress_prints_epochs_and_rungs(tmp_path, capsys):
    """The driver-side lines of a running trial, from its metrics.csv and its reports."""
    from types import SimpleNamespace

    from unibct_ray.distributed.train import _append_metrics
    from unibct_ray.distributed.tune import TrialProgress
    from unibct_ray.tuning import SearchParam, TuneSpec

    spec = TuneSpec(source="t.yaml", name="t", storage=str(tmp_path), base="b.yaml",
                    base_config={"optim": {"epochs": 12}}, validation="v", old_checkpoint="o.pt",
                    space=(SearchParam("compat.weight", "loguniform", 0.3, 3.0),
                           SearchParam("optim.epochs", "int", 4, 8)), far=1e-3)
    cb = TrialProgress(spec.to_json(), str(tmp_path))
    cb.POLL_S = 0.0
    trial = SimpleNamespace(trial_id="abc123", config={"compat.weight": 0.5, "optim.epochs": 6})
    csv_path = tmp_path / "trials" / "abc123" / "metrics.csv"
    csv_path.parent.mkdir(parents=True)

    def epoch(e: int) -> None:
        _append_metrics(csv_path, {"epoch": e, "loss": 2.5 - e / 10, "head_loss": 2.0, "compat_loss": 0.5 - e / 10,
                                   "compat_weight": 3.0, "lr": 0.1, "images_per_s": 250.0, "epoch_s": 4.0})

    cb.on_trial_start(0, [trial], trial)
    epoch(1)
    cb.on_step_end(1, [trial])
    epoch(2)
    rung = {"epoch": 2, "final": False, "cross": 0.41, "self_new": 0.52, "self_old": 0.4}
    cb.on_trial_result(2, [trial], trial, rung)
    cb.on_step_end(3, [trial])  # nothing new: nothing printed twice
    cb.on_trial_result(4, [trial], trial, {"epoch": 6, "final": True, "cross": 0.5, "self_new": 0.6, "self_old": 0.4})
    cb.on_trial_complete(5, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "[tune] trial abc123 started: {'compat.weight': 0.5, 'optim.epochs': 6}",
        "[tune] trial abc123 epoch 1/6  loss 2.4000 (head 2.0000, compat 0.4000 x3)  lr 0.1  250 img/s  4.0 s",
        "[tune] trial abc123 epoch 2/6  loss 2.3000 (head 2.0000, compat 0.3000 x3)  lr 0.1  250 img/s  4.0 s",
        "[tune] trial abc123 rung at epoch 2: TAR@FAR=0.001 cross 0.4100  self_new 0.5200  self_old 0.4000",
    ]  # the final TARs are TuneOutputs' line when the trial ends


def test_usage_errors_before_any_work(sweep_inputs, tmp_path, capsys):
    tmp = sweep_inputs
    cases = [
        (["tune", "--config", str(tmp / "tune.yaml")], "--config and --num-samples are required"),
        (["tune", "--resume", str(tmp_path)], "not a `unibct-ray tune` experiment"),
        (["tune", "--resume", str(tmp_path), "--objective", "cross"], "cannot change a resumed experiment"),
    ]
    bad_far = tmp_path / "far.yaml"
    bad_far.write_text((tmp / "tune.yaml").read_text().replace("far: 0.01", "far: 0.001").replace(
        "base: new-l2.yaml", f"base: {tmp / 'new-l2.yaml'}"))
    cases.append((["tune", "--config", str(bad_far), "--num-samples", "2"],
                  "far.yaml: far: 480 impostor pairs of the validation set"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp / "tune" / "sweep").exists()


@pytest.mark.slow
def test_sweep_killed_after_a_trial_resumes_and_finishes(sweep_inputs, ray_session, capsys):
    tmp = sweep_inputs
    exp = tmp / "tune" / "sweep"
    t0 = time.monotonic()
    proc = tune_cli(ray_session, "--config", str(tmp / "tune.yaml"), "--num-samples", str(NUM_SAMPLES))
    try:
        while not (finished := list((exp / "trials").glob("*/final_result.json"))):
            assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{proc.stdout.read()}"
            assert time.monotonic() - t0 < TIMEOUT_S, "no trial finished in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (and anything it forked) dies now
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1 = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL
    assert len(finished) == 1, "the second trial finished before the kill: nothing left to resume"
    first = finished[0].parent
    first_result = json.loads(finished[0].read_text())
    t_kill = time.monotonic() - t0

    proc = tune_cli(ray_session, "--resume", str(exp))
    try:
        log2, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"first run:\n{log1[-3000:]}\nresumed run:\n{log2[-3000:]}"
    print(f"\nkilled after {t_kill:.0f} s, resumed run {time.monotonic() - t0 - t_kill:.0f} s")

    doc = json.loads((exp / "trials.json").read_text())
    assert doc["done"] and doc["num_samples"] == NUM_SAMPLES
    trials = {t["trial_id"]: t for t in doc["trials"]}
    assert len(trials) == NUM_SAMPLES and all(t["state"] == "TERMINATED" and t["final"] for t in trials.values())
    assert {p.parent.name for p in (exp / "trials").glob("*/final_result.json")} == set(trials)
    # one home per trial: Ray Tune's log of it sits in the trial's run directory
    assert not list(exp.glob("trial-*")) and all((exp / "trials" / t / "params.json").is_file() for t in trials)
    # the trial that finished before the kill was not trained or evaluated again ...
    attempts = (first / "attempts.log").read_text().splitlines()
    assert sum(line.endswith(" train") for line in attempts) == 1, attempts
    assert not any("resume training" in line for line in attempts), attempts
    assert len((first / "metrics.csv").read_text().splitlines()) == 1 + 1  # header + its one epoch
    assert {k: trials[first.name][k] for k in ("cross", "self_new", "self_old")} == \
        {k: first_result[k] for k in ("cross", "self_new", "self_old")}
    # ... and the one the kill interrupted ran again to the end
    [second] = [t for t in trials if t != first.name]
    assert (exp / "trials" / second / "final.pt").is_file()
    # the console followed each trial from the driver (a trial's own stdout does not reach it):
    # its start and its epoch, read from its metrics.csv
    assert f"[tune] trial {first.name} started: " in log1 and f"[tune] trial {second} started: " in log2
    for t in trials:
        assert f"[tune] trial {t} epoch 1/1  loss " in log1 + log2, (t, log1[-2000:], log2[-2000:])

    # outputs: the Pareto front by hand, its configs loadable by `unibct-ray train`, the plot
    pts = {t: (r["cross"], r["self_new"]) for t, r in trials.items()}
    front = {t for t, (c, s) in pts.items()
             if not any(c2 >= c and s2 >= s and (c2, s2) != (c, s) for t2, (c2, s2) in pts.items())}
    assert set(doc["pareto"]) == front
    assert {p.stem for p in (exp / "pareto").glob("*.yaml")} == front
    spec_space = {"compat.weight", "compat.l2_margin"}
    for t in front:
        cfg = load_config(exp / "pareto" / f"{t}.yaml")
        assert cfg.name == f"new-l2-{t}" and cfg.storage == str(tmp / "runs")
        assert cfg.compat.weight == trials[t]["params"]["compat.weight"]
        assert cfg.compat.l2_margin == trials[t]["params"]["compat.l2_margin"]
        assert set(trials[t]["params"]) == spec_space
        assert 1.0 <= cfg.compat.weight <= 20.0
    md = (exp / "tune.md").read_text()
    assert "## Pareto front" in md and all(f"| {t}" in md for t in trials)
    assert "(experiment still running)" not in md
    assert Image.open(exp / "pareto.png").size[0] > 100
    assert "[tune] resuming" in log2

    # The sweep signed what Ray Tune restores from, through the kill (the resume above verified
    # it first): Tune's state, the per-trial params.pkl and the recipe are all in the manifest.
    signed = json.loads((exp / SIGNATURE_FILE).read_text())["files"]
    tune_files = {f"trials/{r}" for r in tune_state_files(exp / "trials")}
    assert {"tune-spec.json", "trials/tuner.pkl"} <= set(signed) and tune_files <= set(signed)
    assert any(f.startswith("trials/experiment_state-") for f in signed)
    assert {f"trials/{t}/params.pkl" for t in trials} <= set(signed)
    # A tuner.pkl replaced by a pickle that runs code is refused before Ray Tune reads it.
    marker = tmp / "ran"
    payload = b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."  # open(marker, "w")
    pickle.loads(payload)
    assert marker.exists(), "the payload is not real"
    marker.unlink()
    tuner_pkl = exp / "trials" / "tuner.pkl"
    good = tuner_pkl.read_bytes()
    tuner_pkl.write_bytes(payload)
    assert main(["tune", "--resume", str(exp), "--address", ray_session.get_runtime_context().gcs_address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tuner_pkl}: changed since the sweep signed it" in err[0], err
    assert not marker.exists()
    tuner_pkl.write_bytes(good)
    verify_experiment(exp, "trials", extra=("tune-spec.json",))
