"""The evaluation report: ``report.json`` schema, markdown summary and ROC/CMC plots.

Schema (other keys may be added, these are fixed)::

    verification:   {self_old|self_new|cross: {"1e-6": tar, ..., "1e-1": tar}}
    identification: {self_old|self_new|cross: {"top1", "top5", "top10",
                                               "tpir@fpir=1e-2", "tpir@fpir=1e-1"}}
    compatible:      bool, or null with a single model (or an undefined TAR)
    compatible_rule: the rule that decided ``compatible``
    difference:      {"value": TAR(cross) - TAR(self_old) at the criterion FAR,
                      "ci95": [low, high] | null, "far": criterion FAR}
    protocol:        settings used (criterion FAR, flip, score weighting, bootstrap, seed,
                     kNN backend, ...)

Undefined values (NaN) are written as JSON ``null``, each with an entry in ``notes``.
Files are written atomically (temporary file in the same directory, then ``os.replace``),
so a reader never sees half a report.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unibct_ray.atomic import atomic_write
from unibct_ray.metrics.bootstrap import BootstrapResult
from unibct_ray.metrics.identification import FPIRS, KS, metric_keys
from unibct_ray.metrics.verification import FARS, RocCurve, rate_key

__all__ = ["TESTS", "build_report", "write_report", "report_markdown", "start_plot_process", "stop_plot_process"]

#: Test names in report order.
TESTS: tuple[str, ...] = ("self_old", "self_new", "cross")

# Figure size in pixels (6.4 x 4.8 in at 100 dpi).
_FIG_INCHES, _DPI = (6.4, 4.8), 100
# Points drawn per curve: about one per pixel column of the figure (the IJB-C ROC has ~2.5M
# points). Drawing only: the report's numbers come from the full curves.
_PLOT_POINTS = int(_FIG_INCHES[0] * _DPI)


def _clean(x: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def build_report(
    verification: Mapping[str, Mapping[str, float]],
    identification: Mapping[str, Mapping[str, float]],
    *,
    criterion_far: float = 1e-4,
    criterion_tar: Mapping[str, float] | None = None,
    bootstrap: BootstrapResult | None = None,
    protocol: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble the report dict.

    Args:
        verification: {test: {far key: TAR}} for the tests that were run.
        identification: {test: {metric key: value}} for the same tests.
        criterion_far: FAR of the compatibility criterion (Shen et al. 2020: cross > self_old).
        criterion_tar: {test: TAR at ``criterion_far``}; needed only when that FAR is not
            one of the verification keys.
        bootstrap: intervals, or None when the bootstrap is disabled (N = 0).
        protocol, counts: extra settings and sizes to record.
        notes: remarks to carry into the report (e.g. why a value is undefined).

    Returns:
        A JSON-ready dict (NaN as None) with the schema in the module docstring.

    Rule: compatible = TAR(cross) > TAR(self_old) at ``criterion_far`` and, when the
    bootstrap ran, the lower end of the 95% interval of the paired difference is > 0.
    """
    for section, data in (("verification", verification), ("identification", identification)):
        unknown = sorted(set(data) - set(TESTS))
        if unknown:
            raise ValueError(f"build_report: unknown {section} test(s) {unknown}; use {TESTS}")
    key = rate_key(criterion_far)

    def crit(test: str) -> float:
        if criterion_tar is not None and test in criterion_tar:
            return _num(criterion_tar[test])
        if key not in verification[test]:
            raise ValueError(
                f"build_report: TAR at the criterion FAR {key} of test {test!r} is missing; "
                "pass criterion_tar"
            )
        return _num(verification[test][key])

    all_notes = list(notes)
    compatible: bool | None = None
    diff_value: float | None = None
    diff_ci: list[float] | None = None
    boot_n = bootstrap.n if bootstrap is not None else 0
    if "cross" in verification and "self_old" in verification:
        diff_value = crit("cross") - crit("self_old")
        if bootstrap is not None:
            diff_ci = bootstrap.difference
        if not math.isfinite(diff_value):
            rule = f"undefined: TAR at FAR={key} is NaN for cross or self_old"
            all_notes.append(f"compatibility undecided: TAR at FAR={key} undefined")
        elif boot_n > 0:
            rule = (
                f"TAR(cross) > TAR(self_old) at FAR={key} and the lower end of the 95% "
                f"bootstrap interval of TAR(cross) - TAR(self_old) > 0 ({boot_n} subject "
                "resamples)"
            )
            compatible = bool(diff_value > 0 and diff_ci is not None and diff_ci[0] > 0)
        else:
            rule = (
                f"TAR(cross) > TAR(self_old) at FAR={key} (bootstrap disabled: no interval "
                "on the difference)"
            )
            compatible = bool(diff_value > 0)
    else:
        rule = "not applicable: needs both the old and the new model (cross and self_old)"

    report: dict[str, Any] = {
        "verification": {t: dict(verification[t]) for t in TESTS if t in verification},
        "identification": {t: dict(identification[t]) for t in TESTS if t in identification},
        "compatible": compatible,
        "compatible_rule": rule,
        "difference": {
            "value": diff_value,
            "ci95": diff_ci,
            "far": criterion_far,
            "definition": f"TAR(cross) - TAR(self_old) at FAR={key}",
        },
        "protocol": {"criterion_far": criterion_far, "bootstrap": boot_n, **dict(protocol or {})},
    }
    if bootstrap is not None:
        report["bootstrap"] = {
            "n": bootstrap.n,
            "seed": bootstrap.seed,
            "subjects": bootstrap.n_subjects,
            "seconds": round(bootstrap.seconds, 3),
            "level": 0.95,
            "verification": bootstrap.verification,
            "identification": bootstrap.identification,
            "difference": bootstrap.difference,
        }
        all_notes.extend(bootstrap.notes)
    if counts is not None:
        report["counts"] = dict(counts)
    for section in ("verification", "identification"):
        for test, vals in report[section].items():
            for k, v in vals.items():
                if v is None or not math.isfinite(float(v)):
                    all_notes.append(f"{section}.{test}.{k} is undefined (null)")
    report["notes"] = list(dict.fromkeys(all_notes))  # de-duplicated, order kept
    return _clean(report)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _table(rows: Mapping[str, Mapping[str, Any]], cols: Sequence[str],
           ci: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    out = ["| test | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for test in TESTS:
        if test not in rows:
            continue
        cells = []
        for c in cols:
            cell = _fmt(rows[test].get(c))
            iv = (ci or {}).get(test, {}).get(c)
            if iv:
                cell += f" [{iv[0]:.4f}, {iv[1]:.4f}]"
            cells.append(cell)
        out.append(f"| {test} | " + " | ".join(cells) + " |")
    return out


def report_markdown(report: Mapping[str, Any]) -> str:
    """Markdown summary: compatibility line, 1:1 and 1:N tables, protocol, notes."""
    far = report["difference"]["far"]
    key = rate_key(far)
    comp = report.get("compatible")
    verdict = "n/a" if comp is None else ("yes" if comp else "no")
    lines = ["# IJB-C evaluation", "", f"Compatible: {verdict} at FAR={key}", "",
             f"Rule: {report['compatible_rule']}", ""]
    diff = report["difference"]
    if diff.get("value") is not None:
        s = f"TAR(cross) - TAR(self_old) at FAR={key}: {diff['value']:+.4f}"
        if diff.get("ci95"):
            s += f" (95% CI [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}])"
        lines += [s, ""]
    boot = report.get("bootstrap") or {}
    far_cols = list(next(iter(report["verification"].values()), {}).keys()) or \
        [rate_key(f) for f in FARS]
    lines += ["## 1:1 verification: TAR @ FAR", ""]
    lines += _table(report["verification"], far_cols, boot.get("verification"))
    id_cols = list(next(iter(report["identification"].values()), {}).keys()) or metric_keys(KS, FPIRS)
    lines += ["", "## 1:N identification (G1 + G2, mixed probes)", ""]
    lines += _table(report["identification"], id_cols, boot.get("identification"))
    if boot:
        lines += ["", f"Intervals: 95% percentile bootstrap over subjects, {boot['n']} "
                      f"replicates, seed {boot['seed']}."]
    lines += ["", "## Protocol", ""]
    lines += [f"- {k}: {v}" for k, v in report.get("protocol", {}).items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    # mode from the umask (mkstemp's 0600 made reports unreadable to a shared group)
    atomic_write(path, data)


def _thin_roc(roc: RocCurve) -> tuple[np.ndarray, np.ndarray]:
    """Points with FPR > 0 (log axis), at most ~_PLOT_POINTS of them, log-spaced in FPR."""
    ok = np.isfinite(roc.fpr) & np.isfinite(roc.tpr) & (roc.fpr > 0)
    fpr, tpr = roc.fpr[ok], roc.tpr[ok]
    if fpr.size > _PLOT_POINTS:
        grid = np.geomspace(fpr[0], fpr[-1], _PLOT_POINTS)
        # Last point at or below each grid FPR keeps the step shape of the curve.
        idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
        fpr, tpr = fpr[idx], tpr[idx]
    return fpr, tpr


def _png(draw: Any) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIG_INCHES, dpi=_DPI)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    # Fixed margins that fit these axes' labels (tight_layout costs ~0.25 s per figure).
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.11, top=0.93)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


Curves = dict[str, tuple[np.ndarray, np.ndarray]]  # test -> (x, y), already thinned for drawing


def _roc_png(curves: Curves, far: float) -> bytes:
    def draw(ax: Any) -> None:
        for test, (fpr, tpr) in curves.items():
            ax.plot(fpr, tpr, label=test, drawstyle="steps-post")
        ax.axvline(far, color="grey", lw=0.8, ls="--", label=f"FAR={rate_key(far)}")
        ax.set_xscale("log")
        # No minor log ticks: building and laying out ~50 of them (grid lines, empty labels)
        # was most of the figure's drawing time; a major tick per decade reads as well.
        from matplotlib.ticker import LogLocator, NullLocator

        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(1e-6, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("FAR")
        ax.set_ylabel("TAR")
        ax.set_title("IJB-C 1:1 verification ROC")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")

    return _png(draw)


def _cmc_png(curves: Curves) -> bytes:
    def draw(ax: Any) -> None:
        for test, (ranks, c) in curves.items():
            ax.plot(ranks, c, marker="." if c.size <= 50 else None, label=test)
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate")
        ax.set_title("IJB-C 1:N CMC (G1 + G2)")
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(loc="lower right")

    return _png(draw)


# --------------------------------------------------------------------------- plot process


class _PlotProcess:
    """A child interpreter that imports matplotlib at once and then draws on request.

    A plain ``python -c`` subprocess: no fork of a process holding BLAS and Ray threads, and
    (unlike multiprocessing's spawn) no re-import of the caller's main module, which may be a
    user's script. Requests are ``.npz`` bytes (loaded with ``allow_pickle=False``) and replies
    PNG bytes, each framed by its length: nothing is unpickled on either side.
    """

    def __init__(self) -> None:
        import subprocess
        import sys

        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from unibct_ray.metrics.report import _plot_serve; _plot_serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def draw(self, jobs: list[tuple[str, Curves, float]]) -> list[bytes] | None:
        """PNG bytes of each ``(kind, curves, far)`` job, or None when the process failed (draw here)."""
        import time

        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        deadline = time.monotonic() + _PLOT_TIMEOUT_S
        try:
            for job in jobs:
                data = _encode_job(*job)
                stdin.write(len(data).to_bytes(8, "little") + data)
            stdin.flush()
            out = []
            for _ in jobs:
                head = _read_exact(stdout.fileno(), 9, deadline)
                value = _read_exact(stdout.fileno(), int.from_bytes(head[1:], "little"), deadline)
                if head[0] != 1:
                    return None
                out.append(value)
            return out
        except (OSError, EOFError, ValueError):  # TimeoutError is an OSError
            return None

    def close(self) -> None:
        # The child holds nothing to save (every PNG came back through the pipe): stop it now,
        # also when a failed command closes it while matplotlib is still loading.
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:  # a broken pipe on flush
                    pass


def _encode_job(kind: str, curves: Curves, far: float) -> bytes:
    arrays = {"kind": np.frombuffer(kind.encode(), np.uint8), "far": np.array([far], np.float64),
              "tests": np.frombuffer("\n".join(curves).encode(), np.uint8)}
    for i, (x, y) in enumerate(curves.values()):
        arrays[f"x{i}"], arrays[f"y{i}"] = np.asarray(x), np.asarray(y)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _run_job(data: bytes) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        kind = z["kind"].tobytes().decode()
        names = z["tests"].tobytes().decode()
        curves = {t: (z[f"x{i}"], z[f"y{i}"]) for i, t in enumerate(names.split("\n") if names else [])}
        far = float(z["far"][0])
    return _roc_png(curves, far) if kind == "roc" else _cmc_png(curves)


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    """``n`` bytes from the pipe ``fd`` (unbuffered, so a wait on it never misses data that a
    buffered reader already holds); TimeoutError past ``deadline``, EOFError when it closes."""
    import select
    import time

    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("plot process")
        b = os.read(fd, n - got)
        if not b:
            raise EOFError("plot process")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _plot_serve() -> None:
    """Child: import matplotlib, draw an empty figure (fonts, text layout), then serve jobs."""
    import sys

    _cmc_png({})
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        data = stdin.read(int.from_bytes(head, "little"))
        try:
            ok, reply = 1, _run_job(data)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which draws itself
            ok, reply = 0, repr(e).encode()
        stdout.write(bytes([ok]) + len(reply).to_bytes(8, "little") + reply)
        stdout.flush()


# A plot that takes longer than this in the child is drawn in the calling process instead.
_PLOT_TIMEOUT_S = 60.0
_PLOTTER: _PlotProcess | None = None


def start_plot_process() -> None:
    """Start a process that imports matplotlib now and draws the next reports' plots.

    matplotlib's import and first figure cost ~0.6 s of a process's time. A command that
    evaluates first and writes its report last (``unibct-ray eval``) calls this at its start,
    so that cost runs beside the evaluation instead of after it. :func:`write_report` uses the
    process while it works and draws in its own process otherwise (the figures are the same).
    """
    global _PLOTTER
    if _PLOTTER is None:
        try:
            _PLOTTER = _PlotProcess()
        except OSError:
            _PLOTTER = None


def stop_plot_process() -> None:
    """Stop the process :func:`start_plot_process` started (a no-op when there is none)."""
    global _PLOTTER
    if _PLOTTER is not None:
        _PLOTTER.close()
        _PLOTTER = None


def _draw_pngs(jobs: list[tuple[str, Curves, float]]) -> list[bytes]:
    if _PLOTTER is not None:
        got = _PLOTTER.draw(jobs)
        if got is not None:
            return got
        stop_plot_process()
    return [_roc_png(curves, far) if kind == "roc" else _cmc_png(curves) for kind, curves, far in jobs]


def write_report(
    report: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    roc_curves: Mapping[str, RocCurve],
    cmc_curves: Mapping[str, np.ndarray],
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``roc.png`` and ``cmc.png`` into ``out_dir``.

    Args:
        report: from :func:`build_report`.
        roc_curves: {test: RocCurve}; cmc_curves: {test: identification rate [K] at ranks 1..K}.

    Returns:
        {"json"|"md"|"roc"|"cmc": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    far = float(report["difference"]["far"])
    roc = {test: _thin_roc(roc_curves[test]) for test in TESTS if test in roc_curves}
    cmc: Curves = {}
    for test in TESTS:
        if test in cmc_curves:
            c = np.asarray(cmc_curves[test], np.float64)
            ranks = np.arange(1, c.size + 1)
            if c.size > _PLOT_POINTS:  # drawing only; the ranks the report quotes stay exact
                keep = np.unique(np.geomspace(1, c.size, _PLOT_POINTS).astype(np.int64)) - 1
                ranks, c = ranks[keep], c[keep]
            cmc[test] = (ranks, c)

    paths = {"json": out / "report.json", "md": out / "report.md",
             "roc": out / "roc.png", "cmc": out / "cmc.png"}
    # report.json last: its presence means the whole report is there (eval refuses to replace
    # it without --overwrite).
    _atomic_write(paths["md"], report_markdown(report).encode())
    roc_png, cmc_png = _draw_pngs([("roc", roc, far), ("cmc", cmc, far)])
    _atomic_write(paths["roc"], roc_png)
    _atomic_write(paths["cmc"], cmc_png)
    _atomic_write(paths["json"], (json.dumps(_clean(report), indent=2, allow_nan=False) + "\n").encode())
    return paths
