"""The README's commands run as written: every fenced command parses with the real parsers.

Each ``unibct-ray ...`` line of a fenced ``bash`` block is parsed by the CLI's own argparse
parser (the dry form: every flag and choice exists), each ``make TARGET`` names a Makefile
target, every repository path a command names exists, and the walk-through's commands read
exactly the paths the commands before them write (the synthetic configs included).
(``python jobs/...`` lines are checked by tests/test_cluster_docs.py with the jobs' parsers.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from unibct_ray.cli import build_parser
from unibct_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def fenced_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks (continuations joined, comments dropped)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def unibct_argvs(text: str) -> list[list[str]]:
    out = []
    for c in fenced_commands(text):
        argv = shlex.split(c)
        if argv and argv[0] in ("unibct-ray", ".venv/bin/unibct-ray"):
            out.append(argv[1:])
    return out


def test_readme_has_the_sections_a_user_looks_for():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 360, f"README.md has {len(lines)} lines; the records belong in docs/"
    heads = [l for l in lines if l.startswith("## ")]
    for want in ("## Quick start", "## Your data", "## Running on a cluster", "## Tuning", "## Results"):
        assert want in heads, want
    # how to run on your data and cluster comes within the first screens after the quick start
    assert heads.index("## Your data") <= 3
    for link in re.findall(r"\]\(((?:docs|cluster)/[^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


def test_every_readme_command_parses():
    parser = build_parser()
    argvs = unibct_argvs(README.read_text())
    assert len(argvs) >= 12
    for argv in argvs:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse exits 2 on an unknown flag or choice
            pytest.fail(f"README command `unibct-ray {' '.join(argv)}` does not parse (exit {e.code})")
        assert callable(args.run)
        for value in vars(args).values():
            if isinstance(value, Path) and str(value).startswith(("jobs/", "cluster/")):
                assert (ROOT / value).exists(), f"`unibct-ray {' '.join(argv)}`: {value} does not exist"


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for c in fenced_commands(README.read_text()):
        if c.startswith("make "):
            assert c.split()[1] in targets, c


def test_the_walk_through_reads_what_it_wrote():
    """In the synthetic walk-through each command's inputs are earlier commands' outputs."""
    parser = build_parser()
    written: set[str] = set()
    for argv in unibct_argvs(README.read_text()):
        if not argv or argv[0] not in ("data", "train", "eval") or "/data/" in " ".join(argv):
            continue
        a = parser.parse_args(argv)
        if argv[0] == "data":
            ins = {"synth": [], "convert": [a.rec.parent if argv[1] == "convert" else None],
                   "split": [getattr(a, "src", None)]}[argv[1]]
            for p in ins:
                assert p is None or str(p) in written, f"`unibct-ray {' '.join(argv)}` reads {p}, written by no earlier command"
            written.add(str(a.out))
            if argv[1] == "split":
                written |= {f"{a.out}/old", f"{a.out}/new"}
        elif argv[0] == "train":
            if a.plan or "synthetic/" not in str(a.config):
                continue  # the cluster examples: their data live on the cluster
            if a.resume is not None:
                assert str(a.resume) in written, a.resume
                continue
            cfg = load_config(ROOT / a.config, a.set or [])
            assert cfg.data.train in written, f"{a.config} reads {cfg.data.train}, written by no earlier command"
            if cfg.compat.old_checkpoint:
                assert cfg.compat.old_checkpoint in written, f"{a.config} needs {cfg.compat.old_checkpoint}"
            written.add(f"{cfg.storage}/{cfg.name}")
            written.add(f"{cfg.storage}/{cfg.name}/final.pt")
        elif argv[0] == "eval":
            assert str(a.ijbc) in written, a.ijbc
            for ckpt in (a.old_checkpoint, a.new_checkpoint):
                if ckpt is not None and not str(ckpt).endswith(("old.pt", "new.pt")):
                    assert str(ckpt) in written, f"eval reads {ckpt}, written by no earlier command"
    assert "demo_out/runs/synthetic-new-unibct/final.pt" in written
