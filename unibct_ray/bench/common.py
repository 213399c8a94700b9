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
           "standalone", "machine", "synthetic_jpegs", "jpeg_shards", "use_package_path"]


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
    """``python -m unibct_ray.bench.NAME``: the same arguments, output and exit status as
    ``unibct-ray bench NAME`` (a ``UserError``: one line, status 2; a result with ``ok: false``
    is printed, then status 1)."""
    from unibct_ray.errors import UserError

    p = argparse.ArgumentParser(prog=f"python -m unibct_ray.bench.{name}", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    add_output_arguments(p)
    a = p.parse_args()
    try:
        result = run(a)
    except UserError as e:
        print(f"unibct-ray: error: {e}", file=sys.stderr)
        sys.exit(2)
    emit(name, result, a.json)
    sys.exit(exit_status(result))


def exit_status(result: Mapping[str, Any] | None) -> int:
    """1 when a bench's result says a check failed (``ok: false``), else 0."""
    return 1 if isinstance(result, Mapping) and result.get("ok") is False else 0


def use_package_path() -> None:
    """Put the directory holding ``unibct_ray`` first on ``PYTHONPATH`` (absolute), before Ray
    starts: Ray workers and actors inherit it and import this copy of the project, also when it
    is not installed (``python -m unibct_ray.bench.NAME`` from a checkout, ``PYTHONPATH=.``, whose
    relative entry would resolve against a worker's own working directory)."""
    import unibct_ray

    root = str(Path(unibct_ray.__file__).resolve().parents[1])
    parts = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and x != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def synthetic_jpegs(n: int, size: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` distinct ``size``-px JPEGs that compress like face crops (a few KB at 112 px).

    Smooth colour fields (an 8x8 random image upsampled bicubically) plus mild pixel noise:
    uniform noise would make 30 KB files whose decode costs several times a real crop's.
    """
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pix = np.asarray(low, np.int16) + rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def jpeg_shards(out: Path, rows: int, *, size: int = 112, distinct: int = 256, per_class: int = 50,
                rows_per_shard: int = 5000, seed: int = 0) -> Path:
    """A shard set of ``rows`` JPEG rows at ``out`` (kept and reused when it exists with the same
    parameters): ``distinct`` images repeated in order (row ``i`` holds image ``i % distinct``),
    label ``i // per_class``, index ``i + 1``, ``rows_per_shard`` rows per file.

    Rendering is the slow part of synthetic data, and a forward pass costs the same on a repeated
    image: a large set for a throughput measurement costs ``distinct`` encodes.
    """
    import json

    import numpy as np
    import pyarrow as pa

    from unibct_ray.data.shards import SHARD_SCHEMA, StagedDir, read_manifest, shard_name, write_manifest, write_shard

    params = {"rows": rows, "size": size, "distinct": distinct, "per_class": per_class,
              "rows_per_shard": rows_per_shard, "seed": seed}
    if (out / "manifest.json").exists():
        try:
            if read_manifest(out).extra.get("synthetic") == params:
                return out
        except Exception:  # a foreign or broken set: rebuilt below
            pass
    jpegs = synthetic_jpegs(min(distinct, rows), size, seed)
    with StagedDir(out, overwrite=True) as stage:
        infos = []
        for s in range(0, rows, rows_per_shard):
            i = np.arange(s, min(s + rows_per_shard, rows))
            table = pa.table({"image": [jpegs[k % len(jpegs)] for k in i], "label": i // per_class, "index": i + 1},
                             schema=SHARD_SCHEMA)
            infos.append(write_shard(stage.path / shard_name(len(infos)), table))
        write_manifest(stage.path, infos, rows=rows, classes=(rows + per_class - 1) // per_class,
                       columns=list(SHARD_SCHEMA.names), synthetic=json.loads(json.dumps(params)))
        stage.commit()
    return out
