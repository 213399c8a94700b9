"""jobs/science.py: its flags become a `unibct-ray bench science` command line the real parser reads."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from unibct_ray.cli import build_parser as cli_parser

ROOT = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("job_science", ROOT / "jobs" / "science.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flags_become_the_bench_command_line(tmp_path):
    job = _job()
    a = job.build_parser().parse_args(["--out", str(tmp_path / "s"), "--smoke-test", "--seeds", "3", "4",
                                       "--methods", "bct", "unibct", "--address", "auto"])
    ns = cli_parser().parse_args(job.cli_argv(a))
    assert ns.quick and ns.seeds == [3, 4] and ns.methods == ["bct", "unibct"] and ns.address == "auto"
    assert ns.out == tmp_path / "s" and ns.scenario == "extended-class"


def test_help_and_refused_flags(capsys):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "science.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--smoke-test" in proc.stdout
    with pytest.raises(SystemExit) as e:
        _job().main(["--out", "x", "--num-workers", "4"])
    assert e.value.code == 2 and "--num-workers does not apply" in capsys.readouterr().err
