"""``UNIBCT_RAY_SMALL=1``: the README's commands at a size that runs in about a minute each.

The switch changes how much a command does, never what it reads or writes, so a walk-through
copied from the README produces the same files, in the same places, as the full-size one:

- ``data synth``: at most 40 training identities of at most 6 images, 30 IJB-C subjects and
  3,000 impostor pairs;
- ``train`` and ``tune`` (new runs): ``optim.epochs=2`` (refinement epochs are clamped into the
  shorter run as the config rules say); ``tune`` runs at most 1 trial;
- ``eval``: at most 20 bootstrap resamples.

Each command says on stderr what the switch shrank. ``tests/test_walkthrough.py`` runs the
README's walk-through with it.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["ENV", "enabled", "shrink"]

ENV = "UNIBCT_RAY_SMALL"
SMALL_EPOCHS = 2
_SYNTH_CAPS = {"identities": 40, "images_per_identity": 6, "eval_identities": 30, "impostor_pairs": 3000}


def enabled() -> bool:
    return os.environ.get(ENV, "").strip() not in ("", "0")


def _cap(a: argparse.Namespace, dest: str, most: int, notes: list[str]) -> None:
    v = getattr(a, dest, None)
    if isinstance(v, int) and v > most:
        setattr(a, dest, most)
        notes.append(f"--{dest.replace('_', '-')} {v} -> {most}")


def shrink(a: argparse.Namespace) -> list[str]:
    """Shrink the parsed command ``a`` in place when the switch is on; return what changed."""
    if not enabled():
        return []
    notes: list[str] = []
    command, sub = getattr(a, "command", None), getattr(a, "data_command", None)
    if command == "data" and sub == "synth":
        for dest, most in _SYNTH_CAPS.items():
            _cap(a, dest, most, notes)
    elif command in ("train", "tune") and getattr(a, "resume", None) is None and not getattr(a, "plan", False):
        a.set = [*(a.set or []), f"optim.epochs={SMALL_EPOCHS}"]
        notes.append(f"optim.epochs -> {SMALL_EPOCHS}")
        if command == "tune":
            _cap(a, "num_samples", 1, notes)
    elif command == "eval":
        _cap(a, "bootstrap", 20, notes)
    if notes:
        print(f"unibct-ray: {ENV}=1: {', '.join(notes)}", file=sys.stderr, flush=True)
    return notes
