"""The compatibility matrix of several models: every (query model, gallery model) pair.

A system that never backfills holds galleries embedded by several model versions and queries
them with the newest. For models ``m_1 .. m_k`` in release order, the matrix has a cell for each
pair (query ``m_i``, gallery ``m_j``) with ``i >= j``:

- the diagonal is each model's self test (its own galleries, its own probes);
- an off-diagonal cell is the cross test: gallery/enrolment side embedded by ``m_j``, probe side
  by ``m_i`` (the IJB-C protocol's cross test with ``old = m_j``, ``new = m_i``).

A pair is *compatible* when cross(m_i, m_j) beats self(m_j) at the criterion FAR (Shen et al.
2020; with the bootstrap, also the lower end of the difference's 95% interval above 0): the
rule of :func:`unibct_ray.metrics.report.build_report`, applied per pair.

Each off-diagonal pair is one :func:`unibct_ray.metrics.evaluate.evaluate_features` call with
``old = gallery model`` and ``new = query model``; its full report is kept. A model that is in
no requested pair gets a self-only evaluation. Ray-free: the features come in as arrays.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unibct_ray.metrics.evaluate import Features, evaluate_features
from unibct_ray.metrics.report import _clean

__all__ = ["PAIR_RULES", "matrix_pairs", "evaluate_matrix", "matrix_markdown", "write_matrix", "pair_dir_name"]

#: Which pairs ``--pairs`` asks for: ``all`` (every query newer than its gallery), ``latest``
#: (the newest model against every older gallery: what deploying it without backfill needs),
#: ``adjacent`` (each model against its predecessor: what each training step aimed at).
PAIR_RULES = ("all", "latest", "adjacent")


def matrix_pairs(models: Sequence[str], rule: str = "all") -> list[tuple[str, str]]:
    """(query, gallery) pairs with the query newer than the gallery, in release order.

    >>> matrix_pairs(["v1", "v2", "v3"])
    [('v2', 'v1'), ('v3', 'v1'), ('v3', 'v2')]
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be distinct, got {list(models)}")
    k = len(models)
    if rule == "all":
        return [(models[i], models[j]) for i in range(k) for j in range(i)]
    if rule == "latest":
        return [(models[-1], models[j]) for j in range(k - 1)]
    return [(models[i], models[i - 1]) for i in range(1, k)]


def pair_dir_name(query: str, gallery: str) -> str:
    """Folder of one pair's full report: ``<query>-vs-<gallery>``."""
    return f"{query}-vs-{gallery}"


def evaluate_matrix(
    meta: Any,
    features: Mapping[str, Features],
    models: Sequence[str],
    *,
    pairs: str = "all",
    knn: Any = None,
    criterion_far: float = 1e-4,
    bootstrap: int = 0,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, tuple[dict[str, Any], Any]]]:
    """Evaluate the requested pairs of ``models`` (release order, oldest first).

    Args:
        meta: IJB-C meta (:func:`unibct_ray.data.ijbc.read_ijbc_meta`).
        features: {model name: per-image features [n_images, d] in meta row order}; one
            embedding size for all.
        models: the names, oldest first.
        pairs: one of :data:`PAIR_RULES`.
        knn: the 1:N backend (as for ``evaluate_features``; None = its default).
        criterion_far, bootstrap, seed: as for ``evaluate_features``.

    Returns:
        (matrix, runs): ``matrix`` is the JSON-ready summary (schema below); ``runs`` maps a
        pair folder name (or a model name for a self-only run) to (report, curves).

        matrix = {"models": [...], "pairs": [[query, gallery], ...], "criterion_far": f,
        "fars": [key, ...], "self": {model: {"verification": {far: TAR}, "identification":
        {metric: value}}}, "cells": [{"query", "gallery", "verification", "identification",
        "difference", "compatible"}, ...]}
    """
    missing = [m for m in models if m not in features]
    if missing:
        raise ValueError(f"no features for model(s) {missing}")
    want = matrix_pairs(list(models), pairs)
    kw: dict[str, Any] = {"criterion_far": criterion_far, "bootstrap": bootstrap, "seed": seed}
    if knn is not None:
        kw["knn"] = knn
    runs: dict[str, tuple[dict[str, Any], Any]] = {}
    selfs: dict[str, dict[str, Any]] = {}
    cells: list[dict[str, Any]] = []
    for q, g in want:
        report, curves = evaluate_features(meta, features[g], features[q], **kw)
        runs[pair_dir_name(q, g)] = (report, curves)
        for model, test in ((g, "self_old"), (q, "self_new")):
            selfs.setdefault(model, {"verification": report["verification"][test],
                                     "identification": report["identification"][test]})
        cells.append({"query": q, "gallery": g, "verification": report["verification"]["cross"],
                      "identification": report["identification"]["cross"],
                      "difference": report["difference"], "compatible": report["compatible"]})
    for m in models:
        if m not in selfs:  # in no requested pair (one model, or ``latest``/``adjacent`` gaps)
            report, curves = evaluate_features(meta, features[m], None, **kw)
            runs[m] = (report, curves)
            selfs[m] = {"verification": report["verification"]["self_old"],
                        "identification": report["identification"]["self_old"]}
    any_report = next(iter(runs.values()))[0]
    matrix = {
        "models": list(models),
        "pairs": [[q, g] for q, g in want],
        "pair_rule": pairs,
        "criterion_far": criterion_far,
        "fars": list(any_report["verification"]["self_old"]),
        "compatible_rule": "cross(query, gallery) > self(gallery) at the criterion FAR"
                           + (" and the lower end of the 95% bootstrap interval of the difference > 0"
                              if bootstrap else ""),
        "self": {m: selfs[m] for m in models},
        "cells": cells,
        "counts": any_report.get("counts", {}),
    }
    return _clean(matrix), runs


def _cell(matrix: Mapping[str, Any], query: str, gallery: str) -> Mapping[str, Any] | None:
    if query == gallery:
        return matrix["self"][query]
    for c in matrix["cells"]:
        if c["query"] == query and c["gallery"] == gallery:
            return c
    return None


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _far_key(matrix: Mapping[str, Any], far: str | None) -> str:
    from unibct_ray.metrics.verification import rate_key

    return far or rate_key(float(matrix["criterion_far"]))


def matrix_markdown(matrix: Mapping[str, Any], far: str | None = None, title: str | None = None) -> list[str]:
    """Two tables (1:1 TAR at ``far``, default the criterion FAR; 1:N top-1): rows are query
    models, columns gallery models; an off-diagonal cell says whether the pair is compatible."""
    key = _far_key(matrix, far)
    models = matrix["models"]
    lines = [f"## {title}", ""] if title else []
    for what, get in ((f"1:1 TAR at FAR={key}", lambda c: c["verification"].get(key)),
                      ("1:N top-1 (G1 + G2)", lambda c: c["identification"].get("top1"))):
        lines += [f"{what}; rows: query model, columns: gallery model", "",
                  "| query \\ gallery | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for i, q in enumerate(models):
            row = []
            for j, g in enumerate(models):
                c = _cell(matrix, q, g) if j <= i else None
                if c is None:
                    row.append("" if j > i else "-")
                elif q == g:
                    row.append(f"{_fmt(get(c))} (self)")
                else:
                    row.append(f"{_fmt(get(c))} {'compatible' if c['compatible'] else 'NOT compatible'}"
                               if what.startswith("1:1") else _fmt(get(c)))
            lines.append(f"| {q} | " + " | ".join(row) + " |")
        lines.append("")
    ok = [c for c in matrix["cells"] if c["compatible"]]
    lines.append(f"Compatible pairs: {len(ok)} of {len(matrix['cells'])} ({matrix['compatible_rule']}).")
    for c in matrix["cells"]:
        d = c["difference"]
        ci = d.get("ci95")
        lines.append(f"- {c['query']} -> {c['gallery']} gallery: cross - self({c['gallery']}) = "
                     + ("n/a" if d.get("value") is None else f"{float(d['value']):+.3f}")
                     + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                     + f": {'compatible' if c['compatible'] else 'NOT compatible'}")
    return lines


def draw_matrix(ax: Any, matrix: Mapping[str, Any], far: str | None = None, title: str = "") -> Any:
    """A heat-map of the 1:1 TAR at ``far`` on ``ax``: lower triangle and diagonal filled, each
    cell annotated with its TAR and, off the diagonal, whether the pair is compatible."""
    key = _far_key(matrix, far)
    models = matrix["models"]
    k = len(models)
    grid = np.full((k, k), np.nan)
    for i, q in enumerate(models):
        for j, g in enumerate(models[: i + 1]):
            c = _cell(matrix, q, g)
            if c is not None and c["verification"].get(key) is not None:
                grid[i, j] = float(c["verification"][key])
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0)
    for i, q in enumerate(models):
        for j, g in enumerate(models[: i + 1]):
            c = _cell(matrix, q, g)
            if c is None:
                continue
            mark = "self" if i == j else ("compatible" if c["compatible"] else "NOT")
            v = grid[i, j]
            ax.text(j, i, f"{'n/a' if np.isnan(v) else f'{v:.3f}'}\n{mark}", ha="center", va="center",
                    fontsize=8, color="white" if np.isnan(v) or v < 0.6 else "black")
    ax.set_xticks(range(k), models)
    ax.set_yticks(range(k), models)
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    ax.set_title(title or f"1:1 TAR @ FAR={key}")
    return im


def write_matrix(matrix: Mapping[str, Any], out: Path, runs: Mapping[str, tuple[dict[str, Any], Any]] | None = None,
                 title: str = "Compatibility matrix") -> None:
    """Write ``matrix.md``, ``matrix.png`` and (last) ``matrix.json`` into ``out``; with ``runs``,
    each pair's full report under ``out/pairs/<query>-vs-<gallery>/`` (``report.json`` ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unibct_ray.atomic import atomic_write
    from unibct_ray.metrics.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    for name, (report, curves) in (runs or {}).items():
        write_report(report, out / "pairs" / name, curves.roc, curves.cmc)
    atomic_write(out / "matrix.md", ("\n".join([f"# {title}", "", *matrix_markdown(matrix)]) + "\n").encode())
    k = len(matrix["models"])
    fig = Figure(figsize=(1.3 * k + 2.2, 1.1 * k + 1.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = draw_matrix(ax, matrix, title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out / "matrix.png", buf.getvalue())
    atomic_write(out / "matrix.json", (json.dumps(matrix, indent=2, allow_nan=False) + "\n").encode())
