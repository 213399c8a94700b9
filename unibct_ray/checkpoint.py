"""Training checkpoints: one ``checkpoint.pt`` per epoch, loaded safely.

A checkpoint holds only tensors, numbers, strings and containers of them, and is always loaded
with ``torch.load(..., weights_only=True)``: a file cannot run code when it is opened (a
hostile pickle is refused with a clear error).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from unibct_ray.atomic import fsync_dir, temp_name
from unibct_ray.errors import DataFormatError

__all__ = ["CHECKPOINT_FILE", "FORMAT", "save_checkpoint", "load_checkpoint", "checkpoint_config",
           "build_backbone_from_checkpoint", "find_latest_checkpoint", "find_resumable_checkpoint",
           "check_finite_weights"]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "unibct-ray/checkpoint"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` to a uniquely named temporary file beside ``path``, fsync, rename.

    A kill at any moment leaves either the old file or the complete new one, never a
    truncated ``path``; the fsyncs make that hold across a power loss too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": 1, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_finite_weights(state: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose model or head weights hold NaN/inf (a diverged run's last save).

    Raises:
        DataFormatError: naming the file and the first non-finite tensor.
    """
    for part in ("model", "head"):
        tensors = state.get(part)
        if not isinstance(tensors, dict):
            continue
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataFormatError(f"{where}: {part} weight {name!r} holds NaN/inf (a diverged run); "
                                      "refused")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file (or a directory holding ``checkpoint.pt``) with ``weights_only``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise DataFormatError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            what = msg[msg.find("GLOBAL"):].split(" was ")[0] if "GLOBAL" in msg else "a global"
            raise DataFormatError(f"{p}: refused to load: the file holds objects other than tensors and "
                                  f"plain data, which could run code ({what[:120]})") from None
        detail = msg[msg.find("WeightsUnpickler error:"):].splitlines() if "WeightsUnpickler error:" in msg else []
        detail = " ".join(x.strip() for x in detail[:3] if x.strip()) or type(e).__name__
        raise DataFormatError(f"{p}: not a readable PyTorch checkpoint ({detail[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise DataFormatError(f"{p}: not a readable PyTorch checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataFormatError(f"{p}: not a unibct-ray checkpoint (no '{FORMAT}' format tag)")
    check_finite_weights(state, str(p))
    return state


def checkpoint_config(state: dict[str, Any], where: str = "checkpoint"):
    """The ``TrainConfig`` stored in a checkpoint."""
    from unibct_ray.config import from_dict

    return from_dict(json.loads(state["config"]), where)


def build_backbone_from_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict]:
    """(backbone in eval mode with the checkpoint's weights, its TrainConfig, the state)."""
    from unibct_ray.models.iresnet import build_backbone

    state = load_checkpoint(path)
    cfg = checkpoint_config(state, str(path))
    model = build_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.data.image_size, cfg.model.dropout)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        # torch's first line is a heading ("Error(s) in loading state_dict ..."); the next says what.
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        if len(detail) > 100 and ", " in detail:
            detail = detail.split(", ")[0] + ", ..."
        raise DataFormatError(f"{path}: weights do not fit a {cfg.model.backbone} backbone "
                              f"({detail[:160]})") from None
    model.eval()
    return model, cfg, state


def _candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint.pt`` under ``run_dir`` with a readable ``meta.json``, newest first
    (highest epoch, then latest mtime)."""
    found: list[tuple[int, float, Path]] = []
    for p in Path(run_dir).rglob(CHECKPOINT_FILE):
        try:
            epoch = int(json.loads((p.parent / "meta.json").read_text())["epoch"])
            mtime = p.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign directory is skipped, never trusted
        found.append((epoch, mtime, p))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [p for _, _, p in found]


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint.pt`` with the highest epoch under ``run_dir`` (None if there is none).

    Reads the small ``meta.json`` written beside each checkpoint, not the weights.
    """
    c = _candidates(run_dir)
    return c[0] if c else None


def find_resumable_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``run_dir`` that loads and verifies -> (path, skipped).

    Ray Train copies checkpoint folders without an atomic rename, so the newest one can be
    truncated (a kill mid-copy) or hold NaN weights (a diverged step). Those are skipped, with
    the reason, and the previous good one is returned: a resume loses an epoch, not the run.
    """
    skipped: list[tuple[Path, str]] = []
    for p in _candidates(run_dir):
        try:
            load_checkpoint(p)
        except DataFormatError as e:
            skipped.append((p, str(e)))
            continue
        return p, skipped
    return None, skipped
