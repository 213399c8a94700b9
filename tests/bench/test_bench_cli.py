"""One home for benchmarks: every bench is reachable as ``unibct-ray bench NAME``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unibct_ray.bench import BENCHES
from unibct_ray.bench.common import flatten, format_table, side_by_side, timing_summary


def test_bench_help_lists_every_bench_module():
    import pkgutil

    import unibct_ray.bench as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - {"common"}
    registered = {module.rsplit(".", 1)[1] for module, _ in BENCHES.values()}  # prototypes-oracle -> oracle
    assert modules == registered, "a bench module that `unibct-ray bench` does not register (or the reverse)"
    proc = subprocess.run([sys.executable, "-m", "unibct_ray.cli", "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in BENCHES:
        assert f"\n  {name} " in proc.stdout
        sub = subprocess.run([sys.executable, "-m", "unibct_ray.cli", "bench", name, "--help"],
                             capture_output=True, text=True)
        assert sub.returncode == 0 and "--json" in sub.stdout, (name, sub.stderr)


def test_side_by_side_alternates_rounds():
    calls: list[str] = []
    times = side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=True)
    assert calls == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]
    s = timing_summary([2.0, 1.0, 4.0], work=10, unit="images")
    assert s == {"best_s": 1.0, "median_s": 2.0, "images_per_s": 10.0}
    with pytest.raises(ValueError):
        side_by_side({"a": lambda: None}, repeats=0)


def test_table_and_json_carry_the_same_leaves(tmp_path):
    result = {"x": 1.23456, "nested": {"y": [1, 2], "z": "ok"}, "runs": [{"s": 0.5}, {"s": 0.25}]}
    assert flatten(result) == [("x", 1.23456), ("nested.y", [1, 2]), ("nested.z", "ok"),
                               ("runs[0].s", 0.5), ("runs[1].s", 0.25)]
    table = format_table(result)
    assert "nested.z" in table and "1.235" in table
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "unibct_ray.bench.refine", "--classes", "20", "--scaling",
                           "--repeats", "1", "--d", "8", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    assert saved["comparison"]["classes"] == 20 and "comparison.classes" in proc.stdout

