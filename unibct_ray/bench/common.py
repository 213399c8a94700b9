"""What every bench shares: side-by-side timing and one output format.

Timing: the contenders run in alternating rounds (A, B, A, B, ...) so that a shared, noisy
machine slows both alike; each keeps every round's wall time, and ratios are quoted from one
run. Output: a human table of the result's scalar leaves, then the whole result as JSON (also
written to ``--json PATH`` when given), so the README can quote either.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["side_by_side", "timing_summary", "flatten", "format_table", "emit", "add_output_arguments",
           "standalone", "machine"]


def side_by_side(contenders: Mapping[str, Callable[[], Any]], repeats: int = 3,
                 warmup: bool = False) -> dict[str, list[float]]:
    """Run every contender once per round, ``repeats`` rounds, alternating -> {name: [seconds]}.

    ``warmup``: one untimed round first (imports, caches, JIT).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def timing_summary(seconds: list[float], work: float | None = None, unit: str = "items") -> dict[str, float]:
    """``{"best_s", "median_s"[, f"{unit}_per_s" at the best]}`` of one contender's rounds."""
    best = min(seconds)
    out = {"best_s": round(best, 4), "median_s": round(statistics.median(seconds), 4)}
    if work is not None:
        out[f"{unit}_per_s"] = round(work / best, 2)
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on (the machine may be shared: the load says how busy)."""
    return {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def flatten(result: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of a nested result as ``(dotted.key, value)``; lists of scalars stay whole."""
    rows: list[tuple[str, Any]] = []
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows.extend(flatten(v, f"{key}."))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                rows.extend(flatten(x, f"{key}[{i}]."))
        else:
            rows.append((key, v))
    return rows


def format_table(result: Mapping[str, Any]) -> str:
    """A two-column text table of :func:`flatten` (floats to 4 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    rows = flatten(result)
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def emit(name: str, result: Mapping[str, Any] | None, json_path: Path | None = None) -> None:
    """Print ``result`` as a table and as JSON; write the JSON to ``json_path`` (temp + rename)."""
    if result is None:
        return
    text = json.dumps(result, indent=2, default=str)
    print(f"== bench {name}")
    print(format_table(result))
    print(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, json_path)
        print(f"wrote {json_path}", file=sys.stderr)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON here")


def standalone(name: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], Mapping[str, Any] | None]) -> None:
    """``python -m unibct_ray.bench.NAME``: the same arguments and output as ``unibct-ray bench NAME``."""
    p = argparse.ArgumentParser(prog=f"python -m unibct_ray.bench.{name}", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    add_output_arguments(p)
    a = p.parse_args()
    emit(name, run(a), a.json)
