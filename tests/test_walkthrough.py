"""The README's synthetic walk-through, run as written, in order, in an empty directory.

The fenced ``unibct-ray`` commands of the sections from "Try every step on synthetic data" to
"Tuning" are taken from README.md literally; only the ones that need a real data set or a
cluster (paths under ``/data/``, the MS1Mv3 configs, ``--plan``) are left out. They run through
the CLI's ``main``, in one process whose working directory is an empty folder, with
``UNIBCT_RAY_SMALL=1`` (the documented small-size switch: fewer
identities and epochs, the same files in the same places), so a README whose commands stopped
connecting - a path one command writes and the next does not read, a flag that changed - fails
here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unibct_ray import cli, small

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIRST, LAST = "### Try every step on synthetic data", "## Running on a cluster"


def walkthrough(text: str) -> list[list[str]]:
    """argv of each runnable ``unibct-ray`` command of the walk-through sections, in order."""
    start = text.index(FIRST)
    parts = [text[start:text.index(LAST, start)], text[text.index("## Tuning"):]]
    out = []
    for part in parts:
        for block in re.findall(r"```bash\n(.*?)```", part, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                argv = shlex.split(line) if line else []
                if not argv or argv[0] != "unibct-ray":
                    continue
                if any(s.startswith("/data/") or "ms1mv3" in s or s == "--plan" for s in argv):
                    continue  # needs the real data set or a cluster
                out.append(argv[1:])
    return out


def test_the_walkthrough_is_the_part_users_copy():
    cmds = [" ".join(a[:2]) for a in walkthrough((ROOT / "README.md").read_text())]
    # every step of the story is there: data, old model, new model, evaluation, resume, tuning
    for want in ("data synth", "data convert", "data split", "train --config", "eval --ijbc", "tune --config",
                 "tune --resume"):
        assert want in cmds, f"the README's walk-through lost its `{want}` step"


def test_small_switch_shrinks_only_sizes(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setenv(small.ENV, "1")
    a = parser.parse_args(["data", "synth", "--out", "x", "--identities", "300", "--images-per-identity", "4",
                           "--eval-identities", "100"])
    small.shrink(a)
    assert (a.identities, a.images_per_identity, a.eval_identities, str(a.out)) == (40, 4, 30, "x")
    t = parser.parse_args(["train", "--config", "c.yaml", "--set", "optim.lr=0.1"])
    small.shrink(t)
    assert t.set == ["optim.lr=0.1", "optim.epochs=2"]
    r = parser.parse_args(["train", "--config", "c.yaml", "--resume", "runs/x"])
    assert small.shrink(r) == [] and not r.set  # a resumed run keeps its own config
    monkeypatch.setenv(small.ENV, "0")
    e = parser.parse_args(["eval", "--ijbc", "i", "--old-features", "a.npy", "--new-features", "b.npy", "--out", "o"])
    assert small.shrink(e) == [] and e.bootstrap == 200


# The commands run one after the other in one process whose working directory is the walk-through's
# (a Ray started by the suite's process would resolve the relative paths against another one).
DRIVER = """
import json, sys
from unibct_ray import cli
for argv in json.loads(sys.argv[1]):
    print("$ unibct-ray " + " ".join(argv), file=sys.stderr, flush=True)
    code = cli.main(argv)
    if code:
        print(f"exit {code}: unibct-ray {' '.join(argv)}", file=sys.stderr, flush=True)
        sys.exit(code)
"""


def test_readme_walkthrough_runs_as_written(tmp_path):
    argvs = walkthrough((ROOT / "README.md").read_text())
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")  # the commands name the repository's configs
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {small.ENV: "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each command said what the switch shrank, and every step ran
    assert proc.stderr.count(f"{small.ENV}=1:") >= 5
    out = tmp_path / "demo_out"
    rep = json.loads((out / "reports" / "unibct" / "report.json").read_text())
    assert set(rep["verification"]) == {"self_old", "self_new", "cross"}
    assert (out / "runs" / "synthetic-new-unibct" / "final.pt").is_file()
    assert (out / "runs" / "synthetic-new-unibct-w2" / "final.pt").is_file()
    assert (out / "tune" / "synthetic-tune-unibct" / "tune.md").is_file()
