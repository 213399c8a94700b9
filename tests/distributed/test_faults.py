"""Faults that really kill something: refinement actors, FAISS shard actors, an evaluation.

Processes are found among the children of this session's raylet (never another Ray on the
machine) by their Ray process title (``ray::RefineActor.refine_arrays``, ``ray::FaissShardActor``)
and killed with SIGKILL while the work runs. The tests poll for the conditions they need; no
sleep assumes an idle machine. (A training worker killed mid-epoch: test_train_e2e.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from unibct_ray.cli import main

TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------- process helpers
def kill_while_running(fn, processes, title_prefix: str, max_kills: int):
    """Run ``fn()`` in a thread; SIGKILL each new process titled ``title_prefix`` (up to
    ``max_kills``; ``processes``: the ``ray_worker_processes`` fixture) until ``fn`` returns
    -> (its result or exception, pids killed)."""
    def ray_processes() -> list[int]:
        return [pid for pid, title in processes().items() if title.startswith(title_prefix)]

    killed: list[int] = []
    earlier = set(ray_processes())  # e.g. actors of an earlier test, on their way out
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        deadline = time.monotonic() + TIMEOUT_S
        while not future.done():
            assert time.monotonic() < deadline, "the work did not finish"
            if len(killed) < max_kills:
                for pid in ray_processes():
                    if pid not in killed and pid not in earlier and len(killed) < max_kills:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                        except ProcessLookupError:
                            pass
            time.sleep(0.01)
        try:
            return future.result(), killed
        except Exception as e:  # handed to the test to inspect
            return e, killed


# ----------------------------------------------------------------------------- refinement actors
def refine_inputs(seed: int = 0):
    """Classes of 600 samples (d = 64): each refinement call runs for a while (the n^3 solve)."""
    rng = np.random.default_rng(seed)
    sizes = [600] * 16 + [1, 2, 7]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    old = rng.standard_normal((len(labels), 64)).astype(np.float32)
    new = old + 0.3 * rng.standard_normal(old.shape).astype(np.float32)
    return old, new, labels, len(sizes)


def test_refinement_actor_killed_is_retried(ray_worker_processes, torch_one_thread):
    from unibct_ray.compat.prototypes import refine_prototypes
    from unibct_ray.distributed.prototypes import RefineParams, refine_distributed

    old, new, labels, c = refine_inputs()
    reference = refine_prototypes(old, new, labels, c).numpy()
    got, killed = kill_while_running(
        lambda: refine_distributed(old, new, labels, c, RefineParams(), workers=2),
        ray_worker_processes, "ray::RefineActor.refine_arrays", max_kills=1)
    assert len(killed) == 1, "no refinement call was caught running"
    assert isinstance(got, np.ndarray), got
    np.testing.assert_allclose(got, reference, atol=1e-5)  # the retried range is exact, none missing


def test_refinement_actors_killed_for_good_fail_cleanly(ray_worker_processes, tmp_path, capsys):
    old, new, labels, _ = refine_inputs(1)
    for name, arr in (("o", old), ("n", new), ("l", labels)):
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "p.npy"
    argv = ["prototypes", "--old-features", str(tmp_path / "o.npy"), "--new-features", str(tmp_path / "n.npy"),
            "--labels", str(tmp_path / "l.npy"), "--out", str(out), "--workers", "2"]
    code, killed = kill_while_running(lambda: main(argv), ray_worker_processes,
                                      "ray::RefineActor.refine_arrays", max_kills=100)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(killed) >= 2  # a restart, then the end of the restarts
    assert err[-1].startswith("unibct-ray: failed: prototype refinement of classes "), err
    assert "no prototypes were written" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["l.npy", "n.npy", "o.npy"]


# ----------------------------------------------------------------------------- extraction actors
def test_extraction_actor_with_live_weights_restarts_and_finishes(ray_worker_processes, tmp_path):
    """Live weights (the in-loop refinement's) reach the extraction actors as a file path, not
    pickled into the pool's constructor arguments: an actor killed mid-pass is restarted and
    rebuilt from the path, the features equal a plain forward pass, and the file is gone after.
    (Ray Data still passes its own map transformer by object-store reference, and Ray core logs
    that restart caution for every pool; the operator holds that reference for the whole pass.)"""
    import io as _io

    import pyarrow as pa
    import torch
    from PIL import Image

    from unibct_ray.data.shards import read_columns, read_manifest, shard_name, write_manifest, write_shard
    from unibct_ray.distributed.data import FEATURE_COLUMN
    from unibct_ray.distributed.extract import extract_features
    from unibct_ray.models.iresnet import build_backbone

    n, size = 256, 32
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pngs = []
    for a in pixels:
        buf = _io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table({"image": pngs, "label": np.arange(n, dtype=np.int64) // 8, "index": np.arange(n, dtype=np.int64)})
    src = tmp_path / "shards"
    src.mkdir()
    infos = [write_shard(src / shard_name(i), table.slice(s, 32)) for i, s in enumerate(range(0, n, 32))]
    write_manifest(src, infos, rows=n, classes=n // 8, columns=table.column_names)
    torch.manual_seed(4)
    spec = {"name": "tiny", "embedding_size": 16, "input_size": size}
    model = build_backbone(**spec).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "features"
    got, killed = kill_while_running(
        lambda: extract_features(src, out, state_dict=state, model_spec=spec, actors=2, batch_size=16),
        ray_worker_processes, "ray::PieceEmbedder.run", max_kills=1)
    assert len(killed) == 1, "no extraction actor was caught running"
    assert got == out, got
    cols = read_columns(read_manifest(out), ["index", FEATURE_COLUMN])
    feats = np.stack(cols[FEATURE_COLUMN]) if cols[FEATURE_COLUMN].dtype == object else cols[FEATURE_COLUMN]
    x = torch.from_numpy((pixels.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(feats[np.argsort(cols["index"])], ref, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features", "shards"]  # the weights file is gone


# ----------------------------------------------------------------------------- FAISS shard actors
def gallery_and_queries(seed: int = 0):
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((120_000, 64)).astype(np.float32)
    queries = rng.standard_normal((600, 64)).astype(np.float32)
    return gallery, queries


def test_shard_actor_keeps_a_built_index(ray_session):
    import ray

    from unibct_ray.distributed.knn import FaissShardActor
    from unibct_ray.metrics.knn import brute_force_knn

    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    a = FaissShardActor.remote()
    try:
        ray.get(a.load.remote(gallery))
        ray.get(a.build.remote("flat", 1024, 32, 32))
        s1, i1 = ray.get(a.search.remote(queries, 7, "flat", 1024, 32, 32))  # the kept index
        s2, i2 = ray.get(a.search.remote(queries, 7, "ivf", 4, 1, 32))  # other parameters: built anew
        ray.get(a.load.remote(gallery[:100]))  # a new gallery drops the kept index
        s3, i3 = ray.get(a.search.remote(queries, 7, "flat", 1024, 32, 32))
    finally:
        ray.kill(a)
    bs, bi = brute_force_knn(gallery, queries, 7)
    np.testing.assert_array_equal(i1, bi)
    np.testing.assert_allclose(s1, bs, rtol=1e-5, atol=1e-5)
    assert np.mean(i2 == bi) < 0.9  # 1 of 4 IVF lists probed: approximate, not the kept exact index
    np.testing.assert_array_equal(i3, brute_force_knn(gallery[:100], queries, 7)[1])


def test_shard_actor_killed_is_replaced(ray_worker_processes):
    from unibct_ray.distributed.knn import RayShardedKNN
    from unibct_ray.metrics.knn import brute_force_knn

    gallery, queries = gallery_and_queries()
    knn = RayShardedKNN(shards=2)
    got, killed = kill_while_running(lambda: knn(gallery, queries, 10), ray_worker_processes,
                                     "ray::FaissShardActor", max_kills=1)
    assert len(killed) == 1 and knn.recoveries == 1, (killed, knn.recoveries)
    assert isinstance(got, tuple), got
    scores, ids = brute_force_knn(gallery, queries, 10)
    np.testing.assert_array_equal(got[1], ids)  # the whole gallery was searched
    np.testing.assert_allclose(got[0], scores, rtol=1e-4, atol=1e-4)


def test_shard_actors_killed_for_good_fail_cleanly(ray_worker_processes):
    from unibct_ray.distributed.knn import RayShardedKNN
    from unibct_ray.errors import JobFailedError

    gallery, queries = gallery_and_queries(1)
    knn = RayShardedKNN(shards=2, retries=1)
    got, killed = kill_while_running(lambda: knn(gallery, queries, 10), ray_worker_processes,
                                     "ray::FaissShardActor", max_kills=100)
    assert isinstance(got, JobFailedError), got
    msg = str(got)
    assert msg.startswith("gallery shard ") and "lost its Ray actor 2 times" in msg, msg
    assert "no search runs on a partial gallery" in msg and len(killed) >= 2


# ----------------------------------------------------------------------------- evaluation resume
def make_checkpoint(path: Path, seed: int) -> Path:
    import torch

    from unibct_ray.checkpoint import save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(seed)
    cfg = from_dict({"model": {"backbone": "tiny", "embedding_size": 16}, "data": {"image_size": 32}})
    return save_checkpoint(path, {"config": json.dumps(to_dict(cfg)), "epoch": 1, "step": 1,
                                  "model": build_backbone("tiny", 16, 32).state_dict()})


@pytest.fixture(scope="module")
def eval_inputs(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    assert main(["data", "synth", "--out", str(d / "synth"), "--identities", "2", "--images-per-identity", "2",
                 "--size", "32", "--eval-identities", "12", "--probes-per-identity", "2",
                 "--impostor-pairs", "200", "--no-progress"]) == 0
    return d / "synth", make_checkpoint(d / "old.pt", 1), make_checkpoint(d / "new.pt", 2)


def eval_argv(ijbc: Path, old: Path, new: Path, out: Path) -> list[str]:
    return ["eval", "--ijbc", str(ijbc), "--old-checkpoint", str(old), "--new-checkpoint", str(new),
            "--out", str(out), "--bootstrap", "0", "--shards", "1", "--actors", "1"]


def file_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


@pytest.mark.slow
def test_eval_killed_after_the_old_model_resumes_from_the_cache(eval_inputs, tmp_path, ray_session, capsys):
    """Both models are embedded in one pass and their cache files are written one after the
    other (old first). The driver is SIGKILLed as soon as the old model's file exists: the new
    model's file may or may not have followed, there is no report. The rerun reuses every cache
    file that exists (same inode and mtime), writes the missing one, and reports exactly what an
    uninterrupted evaluation reports."""
    ijbc, old, new = eval_inputs
    assert main(eval_argv(ijbc, old, new, tmp_path / "reference")) == 0  # uninterrupted
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())

    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "unibct_ray.cli", *eval_argv(ijbc, old, new, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old_glob, new_glob = f"features-{file_key(old)}-*.npy", f"features-{file_key(new)}-*.npy"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not list((out / "cache").glob(old_glob)):  # the old model's features are cached ...
            assert proc.poll() is None, "the evaluation ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # ... and the driver dies before it reports
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "report.json").exists()
    [cached] = list((out / "cache").glob(old_glob))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "cache").glob("features-*.npy")}

    capsys.readouterr()
    assert main(eval_argv(ijbc, old, new, out)) == 0, capsys.readouterr().err
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # reused, not recomputed
    assert cached in before and len(list((out / "cache").glob(new_glob))) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["verification"] == reference["verification"]
    assert report["identification"] == reference["identification"]


@pytest.mark.slow
def test_several_checkpoints_in_one_pass_match_a_plain_loop(eval_inputs, tmp_path):
    """``checkpoints_features``: three models (one at another input size) and a repeated one, in
    one actor-pool pass, each equal to a plain in-process loop (open, align, embed image +
    mirror); one cache file per distinct checkpoint."""
    import torch
    from PIL import Image

    from unibct_ray.checkpoint import build_backbone_from_checkpoint, save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.data.ijbc import read_ijbc_meta
    from unibct_ray.data.images import to_tensor_layout
    from unibct_ray.data.landmarks import align_face
    from unibct_ray.distributed.evaluate import checkpoints_features
    from unibct_ray.models.iresnet import build_backbone

    ijbc, old, new = eval_inputs
    torch.manual_seed(3)
    cfg48 = from_dict({"model": {"backbone": "tiny", "embedding_size": 16}, "data": {"image_size": 48}})
    big = save_checkpoint(tmp_path / "big.pt", {"config": json.dumps(to_dict(cfg48)), "epoch": 1, "step": 1,
                                                "model": build_backbone("tiny", 16, 48).state_dict()})
    meta = read_ijbc_meta(ijbc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = checkpoints_features(meta, [old, big, new, old], tmp_path / "cache", actors=2)
    # a small set is one block: the pool is sized to it (Ray warned of an actor without input)
    assert not [w for w in caught if "concurrent actors" in str(w.message)], [str(w.message) for w in caught]
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 3
    np.testing.assert_array_equal(got[0], got[3])
    for ckpt, feats in zip([old, big, new], got):
        model, cfg, _ = build_backbone_from_checkpoint(ckpt)
        size = cfg.data.image_size
        crops = []
        for name, lm in zip(meta.image_names, meta.landmarks):
            with Image.open(meta.root / "loose_crop" / name) as im:
                crops.append(align_face(np.asarray(im.convert("RGB")), np.asarray(lm, np.float32).reshape(5, 2), size))
        x = torch.from_numpy(to_tensor_layout(np.stack(crops)))
        with torch.inference_mode():
            ref = (model(x) + model(torch.flip(x, dims=[3]))).numpy()
        assert feats.shape == ref.shape
        np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)
