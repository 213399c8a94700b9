"""Checkpoints: atomic saves, non-finite weights refused, resume falls back past a bad newest one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unibct_ray.checkpoint import (
    CHECKPOINT_FILE,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from unibct_ray.errors import DataFormatError


def _epoch_dir(run: Path, epoch: int, weight: float = 1.0) -> Path:
    d = run / f"checkpoint_{epoch:06d}"
    save_checkpoint(d / CHECKPOINT_FILE, {"epoch": epoch, "model": {"w": torch.full((4,), weight)},
                                          "head": {"weight": torch.ones(2, 4)}})
    (d / "meta.json").write_text(json.dumps({"epoch": epoch}))
    return d / CHECKPOINT_FILE


def test_non_finite_weights_are_refused_at_load(tmp_path):
    path = _epoch_dir(tmp_path, 1, weight=float("nan"))
    with pytest.raises(DataFormatError, match=r"model weight 'w' holds NaN/inf"):
        load_checkpoint(path)
    inf = _epoch_dir(tmp_path, 2)
    state = torch.load(inf, weights_only=True)
    state["head"]["weight"][0, 0] = float("inf")
    torch.save(state, inf)
    with pytest.raises(DataFormatError, match=r"head weight 'weight' holds NaN/inf"):
        load_checkpoint(inf)


def test_resume_skips_a_truncated_and_a_diverged_newest_checkpoint(tmp_path):
    good = _epoch_dir(tmp_path, 1)
    nan = _epoch_dir(tmp_path, 2, weight=float("nan"))
    cut = _epoch_dir(tmp_path, 3)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a copy killed half way
    assert find_latest_checkpoint(tmp_path) == cut  # by meta.json alone the broken one looks newest
    path, skipped = find_resumable_checkpoint(tmp_path)
    assert path == good
    assert [p for p, _ in skipped] == [cut, nan]
    assert "not a readable PyTorch checkpoint" in skipped[0][1] and "NaN/inf" in skipped[1][1]
    assert find_resumable_checkpoint(tmp_path / "nothing") == (None, [])


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "final.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]  # no temporary left behind


def test_atomic_writes_get_the_umask_permissions_and_unique_temp_names(tmp_path):
    """Reports were written 0600 (mkstemp); two writers of one path never share a temp name."""
    import os

    from unibct_ray.atomic import atomic_write, temp_name
    from unibct_ray.metrics.report import _atomic_write

    old = os.umask(0o022)
    try:
        _atomic_write(tmp_path / "report.md", b"# report\n")
        atomic_write(tmp_path / "a.txt", ["x", b"y"])
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.txt").read_bytes() == b"xy"
    assert temp_name(tmp_path / "a.txt") != temp_name(tmp_path / "a.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "report.md"]


def test_resume_planning_names_a_missing_folder_and_skips_a_broken_checkpoint(tmp_path, capsys):
    from unibct_ray.config import TrainConfig, to_dict
    from unibct_ray.distributed.train import _plan_run
    from unibct_ray.errors import UserError

    with pytest.raises(UserError, match="run directory not found"):
        _plan_run(TrainConfig(), tmp_path / "missing")
    run = tmp_path / "run"
    cfg = TrainConfig(name="run", storage=str(tmp_path))
    for epoch in (1, 2):
        d = run / f"checkpoint_{epoch:06d}"
        save_checkpoint(d / CHECKPOINT_FILE, {"epoch": epoch, "step": epoch, "metrics": "{}",
                                              "config": json.dumps(to_dict(cfg)), "model": {"w": torch.ones(2)}})
        (d / "meta.json").write_text(json.dumps({"epoch": epoch}))
    newest = run / "checkpoint_000002" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(Exception) as e:  # gets past the resume step, then needs a shard set
        _plan_run(cfg, run)
    assert "shard" in str(e.value) or "manifest" in str(e.value)
    out = capsys.readouterr().out
    assert f"[resume] skipping {newest}" in out


def test_metrics_rows_are_not_repeated_after_a_re_run_epoch(tmp_path):
    import csv

    from unibct_ray.distributed.train import _append_metrics

    path = tmp_path / "metrics.csv"
    for epoch, loss in [(1, 3.0), (2, 2.0), (3, 1.5), (2, 2.1), (3, 1.4)]:  # epochs 2-3 re-run after a resume
        _append_metrics(path, {"epoch": epoch, "loss": loss})
    rows = list(csv.DictReader(open(path)))
    assert [(r["epoch"], r["loss"]) for r in rows] == [("1", "3.0"), ("2", "2.1"), ("3", "1.4")]
