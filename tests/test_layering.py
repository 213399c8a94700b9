"""The core (formats, models, losses, metrics) must import without Ray."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import unibct_ray


def core_modules() -> list[str]:
    mods = []
    for info in pkgutil.walk_packages(unibct_ray.__path__, "unibct_ray."):
        if info.name.startswith(("unibct_ray.distributed", "unibct_ray.cli", "unibct_ray.demo", "unibct_ray.bench")):
            continue
        mods.append(info.name)
    return mods


def test_core_imports_with_ray_blocked():
    mods = core_modules()
    assert "unibct_ray.data.recordio" in mods and "unibct_ray.data.splits" in mods
    code = "import sys; sys.modules['ray'] = None\n" + "".join(f"import {m}\n" for m in mods)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_subcommand_has_help():
    for args in (["--help"], ["data", "--help"], ["data", "synth", "--help"], ["data", "convert", "--help"],
                 ["data", "split", "--help"], ["demo", "--help"], ["bench", "convert", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "unibct_ray.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "usage: unibct-ray" in proc.stdout
