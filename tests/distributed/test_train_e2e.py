"""End to end on local Ray: old model, the four kinds of new model, refinement, resume, and a
training worker killed mid-epoch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import unibct_ray.distributed.train as train_module
from unibct_ray.checkpoint import load_checkpoint
from unibct_ray.cli import main
from unibct_ray.config import from_dict, to_dict
from unibct_ray.distributed.train import train, train_loop_per_worker

pytestmark = pytest.mark.slow


def cfg_for(tmp: Path, name: str, split: str, method: str = "independent", epochs: int = 3, flip: bool = True,
            shuffle_buffer: int = 4096,
            **compat):
    data = {
        "name": name,
        # Flips (seeded by seed, epoch, index) and the shuffle buffer on are the defaults; the
        # worker-kill tests turn both off to fix which rows each rank sees.
        "data": {"train": str(tmp / "split" / split), "image_size": 32, "flip": flip,
                 "shuffle_buffer": shuffle_buffer},
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


# The worker processes of one fit: Ray Train's controller, workers and their synchronisation
# actor, Ray Data's split coordinator of the ingest, and the run's epoch clock.
FIT_PROCESSES = ("ray::TrainController", "ray::RayTrainWorker", "ray::SynchronizationActor", "ray::SplitCoordinator",
                 "ray::_EpochClock")


def released_after_fit(workers, before: set[int], timeout: float = 60.0) -> list[str]:
    """The titles of the node's worker processes started since ``before`` (their pids; the
    session's earlier tests may keep their own) once none of a fit's own is left (Ray ends an
    actor shortly after its last handle goes), agents aside; fails listing those still there
    after ``timeout`` s. ``workers``: the ``ray_worker_processes`` fixture."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        now = sorted(t for pid, t in workers().items()
                     if pid not in before and not t.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")))
        left = [w for w in now if w.startswith(FIT_PROCESSES)]
        if not left:
            return now
        assert time.monotonic() < deadline, f"still running {timeout:.0f} s after the fit returned: {left}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def workspace(ray_session, ray_worker_processes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    before = set(ray_worker_processes())
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
    # The phases the demo runs (synth and convert tasks, a training fit) release their worker
    # processes: the fit's actors end when it returns, not at the next fit, and what stays is
    # Ray Data's session actors plus the raylet's pool of idle workers (at most the node's
    # logical CPUs, 4, are kept; more are reaped after a second idle).
    left = released_after_fit(ray_worker_processes, before)
    assert sum(w == "ray::IDLE" for w in left) <= 4 + 2, left  # + 2 being reaped when listed
    assert len([w for w in left if w != "ray::IDLE"]) <= 4, left
    return tmp


UNIBCT = {"weight": 1.0, "refine_epochs": [1]}


@pytest.mark.parametrize("method,extra", [
    ("independent", {}),
    ("l2", {"weight": 10.0}),
    ("bct", {"weight": 1.0}),
    ("unibct", UNIBCT),
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


def test_nccl_advbct_mixbct_train_in_one_group_fit(workspace):
    """The three queue/discriminator/mixing methods through the real loop, in one fit (one
    worker-group start for the three): each learns, writes what it needs once and checkpoints
    what it trains. Their math is checked in tests/compat and on two workers in
    test_methods_ddp.py; this is the wiring (Ray Data rows with their index, DDP, checkpoints)."""
    from unibct_ray.distributed.train import train_group

    cfgs = [cfg_for(workspace, f"new-{m}", "new", m, epochs=2, **extra) for m, extra in
            [("nccl", {"nccl_queue": 64}), ("advbct", {}), ("mixbct", {})]]
    assert not cfgs[0].head_parallel and cfgs[1].head_parallel  # nccl keeps the replicated head
    results = train_group(cfgs)
    rows = {r.run_dir.name: read_metrics(r.run_dir) for r in results}
    for name, m in rows.items():
        assert [r["epoch"] for r in m] == [1, 2] and m[-1]["head_loss"] < m[0]["head_loss"], name
    assert all(r["compat_loss"] > 0 and r["compat_weight"] == 1.0 for r in rows["new-nccl"] + rows["new-advbct"])
    assert all(r["compat_loss"] == 0 and r["compat_weight"] == 0 for r in rows["new-mixbct"])  # no L_comp
    nccl, advbct, mixbct = (load_checkpoint(r.checkpoint) for r in results)
    assert nccl["compat_state"] is None and mixbct["compat_state"] is None  # nccl's queue refills on resume
    assert {"w", "discriminator.0.weight"} <= set(advbct["compat_state"])
    assert advbct["compat_state"]["w"].shape == (16,)
    assert len(advbct["optimizer"]["param_groups"]) == 2  # the discriminator and radii are trained
    with np.load(results[1].run_dir / "advbct-classes.npz") as z:
        assert z["centres"].shape == (16, 32) and (z["r_max"] > 0).all() and (z["counts"] == 14).all()
    with np.load(results[2].run_dir / "mixbct-credible.npz") as z:
        # ceil(0.9 * 14) = 13 of each class's 14 images
        assert len(z["credible_index"]) == 16 * 13 and np.all(np.diff(z["credible_index"]) > 0)


def drop_checkpoints_after(run: Path, epoch: int) -> None:
    """Cut a run's checkpoints back to ``epoch``, as if the job had died after it: later
    checkpoints, ``final.pt`` and the storage of phases left without a checkpoint go."""
    for meta in list(run.rglob("meta.json")):
        if json.loads(meta.read_text())["epoch"] > epoch:
            shutil.rmtree(meta.parent)
    for phase in run.glob("epochs-*"):
        if not any(phase.rglob("meta.json")):
            shutil.rmtree(phase)
    (run / "final.pt").unlink()


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_a_second_run_with_the_same_seed_is_bit_identical(workspace):
    """Flips on and the shuffle buffer on: the flips are a function of (seed, epoch, index)
    and everything else is seeded, so a second from-scratch run in the same Ray session, after
    other trainings, ends with the same weights, bit for bit. With random flips it did not."""
    first = load_checkpoint(workspace / "runs" / "new-independent" / "final.pt")  # the test above
    again = load_checkpoint(train(cfg_for(workspace, "new-independent-again", "new")).checkpoint)
    assert_same_weights(again, first)


def test_resume_after_interruption(workspace):
    run = workspace / "runs" / "new-independent"  # finished by the test above
    cfg = cfg_for(workspace, "new-independent", "new")
    uninterrupted = load_checkpoint(run / "final.pt")
    # drop the last epoch's checkpoint, as if the job died during epoch 3
    assert any(json.loads(m.read_text())["epoch"] == 3 for m in run.rglob("meta.json"))
    drop_checkpoints_after(run, 2)
    before = read_metrics(run)
    assert [r["epoch"] for r in before] == [1, 2, 3]
    res = train(cfg, resume=run)
    assert load_checkpoint(res.checkpoint)["epoch"] == 3
    after = read_metrics(run)
    # epoch 3 ran again and its row replaced the first attempt's; epochs 1-2 did not run again
    assert [r["epoch"] for r in after] == [1, 2, 3] and after[:2] == before[:2]
    assert after[2]["loss"] == pytest.approx(before[2]["loss"], rel=1e-6) and after[2] != before[2]
    # the re-run epoch 3 saw the same rows and flips: the run ends where it ended before
    assert_same_weights(load_checkpoint(res.checkpoint), uninterrupted)


# A training worker that SIGKILLs itself in the middle of an epoch, on the first attempt only.
# Shipped to the Ray Train workers by value (this test module is not importable there).
KILL_RANK, KILL_EPOCH, KILL_STEP = 1, 2, 3   # rank 1, third epoch (after the refinement), step 4 of 7


def _die_at_step(target: int, marker: Path) -> None:
    """This worker process SIGKILLs itself before its ``target``-th training step (0-based)."""
    import unibct_ray.training as training

    step, done = training.train_step, [0]

    def dying_step(*args, **kwargs):
        if done[0] == target:
            marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
        return step(*args, **kwargs)

    training.train_step = dying_step  # the loop imports train_step when a run starts


def _loop_dying_once(loop: dict) -> None:
    import ray.train

    run = loop["runs"][0]
    marker = Path(run["run_dir"]) / "worker-killed"
    if (ray.train.get_context().get_world_rank() == KILL_RANK and not marker.exists()
            and run["first_epoch"] <= KILL_EPOCH < run["end_epoch"]):
        _die_at_step((KILL_EPOCH - run["first_epoch"]) * run["steps_per_epoch"] + KILL_STEP, marker)
    train_loop_per_worker(loop)


def test_worker_killed_mid_epoch_resumes_to_the_same_model(workspace, monkeypatch):
    """A DDP worker dies (SIGKILL) in epoch 3, after the UniBCT refinement at epoch 1. Ray Train
    restarts the group from the last checkpoint (epoch 1 or 2, depending on when the kill lands
    against the checkpoint upload); the run finishes with the same model, head, optimizer state,
    step/lr, prototypes and compat-weight schedule as an uninterrupted continuation from the
    same epoch-1 state (a copy of the run cut back to epoch 1, resumed without a kill).
    Tolerance: 1e-6 absolute on every tensor (no flips, no shuffle buffer; we observe 0.0).

    The reference starts from the killed run's own epoch-1 state rather than from a second run
    from scratch: two from-scratch runs of this config have been seen to differ in epoch 1 when
    other trainings ran before them in the same Ray session (cause not found; see README)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = cfg_for(workspace, "new-unibct-killed", "new", "unibct", flip=False, shuffle_buffer=0, **UNIBCT)
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_loop_per_worker", _loop_dying_once)
        res = train(cfg)

    run = res.run_dir
    assert (run / "worker-killed").exists(), "the worker was not killed"
    killed_at = (run / "worker-killed").stat().st_mtime
    # the refinement ran once, before the kill, and was not redone on restart
    assert (run / "new_features-epoch001" / "manifest.json").stat().st_mtime < killed_at
    assert (run / "prototypes-epoch001.npy").stat().st_mtime < killed_at
    got = read_metrics(run)
    epochs = [int(r["epoch"]) for r in got]
    assert epochs == [1, 2, 3]  # one row per epoch: a re-run epoch replaced the killed attempt's row
    rows = {r["epoch"]: r for r in got}

    # the reference: the same run cut back to its epoch-1 state, resumed with the plain loop
    ref_run = workspace / "runs" / "new-unibct-killed-ref"
    shutil.copytree(run, ref_run)
    (ref_run / "worker-killed").unlink()
    drop_checkpoints_after(ref_run, 1)  # the second phase's storage goes too
    with open(ref_run / "metrics.csv") as f:
        lines = f.readlines()
    (ref_run / "metrics.csv").write_text("".join(lines[:2]))  # header + epoch 1
    ref_res = train(cfg, resume=ref_run)
    ref = read_metrics(ref_run)
    assert [r["epoch"] for r in ref] == [1, 2, 3]
    for r in ref[1:]:
        for key in ("loss", "head_loss", "compat_loss", "compat_weight", "lr", "steps"):
            assert rows[r["epoch"]][key] == pytest.approx(r[key], rel=1e-6, abs=1e-9), (r["epoch"], key)
    a, b = load_checkpoint(res.checkpoint), load_checkpoint(ref_res.checkpoint)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 3 * 7
    torch.testing.assert_close(a["prototypes"], b["prototypes"], rtol=0, atol=1e-6)
    for part in ("model", "head"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_b
    for k in opt_b:
        torch.testing.assert_close(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"], rtol=0, atol=1e-6)


def _group_loop_dying_once(loop: dict) -> None:
    """Rank KILL_RANK SIGKILLs itself in the *second* run of a group, on the first attempt only."""
    import ray.train

    r0, r1 = loop["runs"]
    marker = Path(r1["run_dir"]) / "worker-killed"
    if ray.train.get_context().get_world_rank() == KILL_RANK and not marker.exists():
        # all the steps of run 0, then run 1 up to step KILL_STEP of its epoch KILL_EPOCH
        _die_at_step((r0["end_epoch"] - r0["first_epoch"]) * r0["steps_per_epoch"]
                     + (KILL_EPOCH - r1["first_epoch"]) * r1["steps_per_epoch"] + KILL_STEP, marker)
    train_loop_per_worker(loop)


def test_group_matches_separate_runs_through_a_killed_worker(workspace, monkeypatch):
    """``train_group``: two runs in one fit, each refining its prototypes inside the loop (rank 0
    drives the extraction and refinement actors while rank 1 waits), and a worker killed in the
    second run. Both must end exactly where the separate run ends: ``new-unibct-killed-ref`` (left
    by the test above; trained here when this test runs alone) went from its epoch-1 state on
    with ``train``, one fit per phase and the refinement in the driver. Both group runs resume
    from that same epoch-1 state."""
    from ray import cloudpickle

    from unibct_ray.distributed.train import train_group

    ref = workspace / "runs" / "new-unibct-killed-ref"
    if not (ref / "final.pt").exists():  # this test run alone: a phased run of the same recipe
        ref = train(cfg_for(workspace, "new-unibct-phased", "new", "unibct", flip=False, shuffle_buffer=0,
                            **UNIBCT)).run_dir
    dirs = []
    for i in range(2):
        d = workspace / "runs" / f"new-unibct-group-{i}"
        shutil.copytree(ref, d)
        drop_checkpoints_after(d, 1)
        (d / "prototypes-epoch001.npy").unlink()  # must be rebuilt inside the loop
        shutil.rmtree(d / "new_features-epoch001")
        (d / "metrics.csv").write_text("".join(open(d / "metrics.csv").readlines()[:2]))
        dirs.append(d)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = cfg_for(workspace, "new-unibct-killed", "new", "unibct", flip=False, shuffle_buffer=0, **UNIBCT)
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_loop_per_worker", _group_loop_dying_once)
        results = train_group([cfg, cfg], resumes=dirs)
    assert (dirs[1] / "worker-killed").exists(), "the worker was not killed"
    assert not (dirs[0] / "worker-killed").exists()
    b = load_checkpoint(ref / "final.pt")
    for d, res in zip(dirs, results):
        assert res.checkpoint == d / "final.pt" and res.run_dir == d
        assert (d / "prototypes-epoch001.npy").exists() and (d / "new_features-epoch001" / "manifest.json").exists()
        assert [int(r["epoch"]) for r in read_metrics(d)][-1] == 3
        a = load_checkpoint(res.checkpoint)
        assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 3 * 7
        torch.testing.assert_close(a["prototypes"], b["prototypes"], rtol=0, atol=1e-6)
        for part in ("model", "head"):
            for k in b[part]:
                torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6, msg=f"{d.name} {part}.{k}")
    assert not any((workspace / "runs" / ".groups").iterdir())  # the group's own checkpoints are gone


def test_group_refuses_runs_that_cannot_share_a_fit(workspace):
    from unibct_ray.config import to_dict
    from unibct_ray.distributed.train import train_group
    from unibct_ray.errors import ConfigError

    a = cfg_for(workspace, "group-a", "new", "l2", weight=10.0)
    b = from_dict({**to_dict(a), "name": "group-b", "global_batch": 64})
    with pytest.raises(ConfigError, match="global_batch differs"):
        train_group([a, b])
    assert not (workspace / "runs" / "group-a").exists() and not (workspace / "runs" / "group-b").exists()


# NaN losses, injected on one rank inside the Train workers (shipped by value, as above).
def _nan_from_step(first: int, last: int) -> None:
    """Steps ``first..last`` (0-based) of this worker see an image full of NaN."""
    import unibct_ray.training as training

    step, done = training.train_step, [0]

    def poisoned_step(module, optimizer, x, labels, **kwargs):
        if first <= done[0] <= last:
            x = x.clone()
            x[0] = float("nan")
        done[0] += 1
        return step(module, optimizer, x, labels, **kwargs)

    training.train_step = poisoned_step


def _loop_with_nan(loop: dict) -> None:
    import ray.train

    first, last = loop["runs"][0]["config"]["name"].split("-nan-")[1].split("-")
    if ray.train.get_context().get_world_rank() == 1:
        _nan_from_step(int(first), int(last))
    train_loop_per_worker(loop)


def test_a_nan_loss_is_skipped_once_and_stops_the_run_when_it_persists(workspace, monkeypatch):
    """One NaN step on one rank: every rank skips it, training goes on with finite weights. NaN
    on every step from step 3: the run stops after optim.nonfinite_steps skipped steps with one
    line naming the step and the loss term, and its last checkpoint holds finite weights."""
    from ray import cloudpickle

    from unibct_ray.errors import JobFailedError

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_loop_per_worker", _loop_with_nan)
        once = from_dict({**to_dict(cfg_for(workspace, "new-nan-2-2", "new", epochs=2)), "max_failures": 0})
        res = train(once)
        state = load_checkpoint(res.checkpoint)  # refuses NaN weights: loading proves they are finite
        got = read_metrics(res.run_dir)
        assert [r["epoch"] for r in got] == [1, 2] and all(np.isfinite(r["loss"]) for r in got)

        always = from_dict({**to_dict(cfg_for(workspace, "new-nan-3-999", "new", epochs=2)), "max_failures": 0,
                            "optim": {**to_dict(once)["optim"], "nonfinite_steps": 2}})
        with pytest.raises(JobFailedError) as e:
            train(always)
    msg = str(e.value)
    assert "head loss is nan at step 5" in msg and "3 non-finite steps in a row" in msg, msg
    assert state["step"] == 2 * 7  # 224 images, global batch 32


def test_old_features_are_extracted_once_per_checkpoint_and_shard_set(workspace, tmp_path, monkeypatch):
    """Two runs of other methods, same old checkpoint and shard set, no cache path set: one
    directory under STORAGE/old_features, one extraction. Another checkpoint: another key."""
    import unibct_ray.distributed.extract as extract_module
    from unibct_ray.distributed.train import _with_old_features, old_features_dir

    calls = []
    real = extract_module.extract_features

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "extract_features", counted)
    storage = tmp_path / "runs"
    train_dir = str((workspace / "split" / "new").resolve())
    a = from_dict({**train_module.to_dict(cfg_for(workspace, "a", "new", "l2", weight=10.0)), "storage": str(storage)})
    b = from_dict({**train_module.to_dict(cfg_for(workspace, "b", "new", "bct")), "storage": str(storage)})
    first = _with_old_features(a, storage / "a", train_dir)
    stamp = (Path(first) / "manifest.json").stat().st_mtime_ns
    second = _with_old_features(b, storage / "b", train_dir)
    assert first == second and len(calls) == 1
    assert (Path(first) / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (storage / "old_features").iterdir()] == [Path(first).name]
    # The key: the checkpoint's and the manifest's sha256, computed here independently.
    import hashlib

    ck = hashlib.sha256(Path(a.compat.old_checkpoint).read_bytes()).hexdigest()[:16]
    mf = hashlib.sha256((Path(train_dir) / "manifest.json").read_bytes()).hexdigest()[:12]
    assert Path(first) == (storage / "old_features" / f"{ck}-{mf}").resolve()
    # Another old checkpoint (same weights, other bytes) gets its own key.
    other = tmp_path / "other.pt"
    state = load_checkpoint(a.compat.old_checkpoint)
    state["metrics"] = json.dumps({"copy": 1})
    torch.save(state, other)
    c = from_dict({**train_module.to_dict(a), "compat": {**train_module.to_dict(a)["compat"], "old_checkpoint": str(other)}})
    assert old_features_dir(c, train_dir) != Path(first) and old_features_dir(c, train_dir).parent == Path(first).parent


def test_a_run_that_lost_the_extraction_race_reads_the_winners_copy(tmp_path):
    """The loser's staged copy cannot replace the winner's (a rename onto a full directory
    fails); its error is dropped when the winner's manifest is there, and kept otherwise."""
    from unibct_ray.data.shards import StagedDir
    from unibct_ray.distributed.train import _reuse_if_raced
    from unibct_ray.errors import UserError

    out = tmp_path / "key"
    stage = StagedDir(out)                     # the loser starts first ...
    (stage.path / "part-00000.parquet").write_bytes(b"loser")
    out.mkdir()                                # ... the winner commits meanwhile
    (out / "manifest.json").write_text("{}")
    with _reuse_if_raced(out):
        with stage:
            stage.commit()
    assert (out / "manifest.json").read_text() == "{}" and not (out / "part-00000.parquet").exists()
    assert not stage.path.exists()             # the loser's staged copy is gone
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(UserError):
        with _reuse_if_raced(empty):
            raise UserError(f"{empty}: appeared while writing")
