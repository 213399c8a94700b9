"""The embedded default end to end on a local Ray (synthetic data, CPU, minutes).

For each upgrade scenario: render a synthetic MS1M ``.rec`` + IJB-C folder (cached between
runs), convert it to Parquet shards, split it, train the old model, train one new model per
method (``independent``, ``l2``, ``bct``, ``unibct`` by default), evaluate each new model
against the old one (self_old / self_new / cross on IJB-C) and write

    DIR/summary.json   {scenario: {method: <report.json of that evaluation>}}
    DIR/summary.md     the comparison table (TAR@FAR=1e-3, with 1e-4 beside it; top-1) and
                       the demo's checks
    DIR/summary.png    TAR@FAR=1e-3 per method and test, with bootstrap intervals

The new models of a scenario train one after the other in a single Ray Train ``fit()``
(``unibct_ray.distributed.train.train_group``: the fixed start-up cost of a fit is paid once,
and UniBCT refines its prototypes inside the loop), and every model's IJB-C features come
from one pass of one actor pool before the evaluations read them.

The configs are ``jobs/configs/synthetic/*.yaml`` - the files a user edits - and every step is
the code the CLI runs on real data. Finished training runs whose config is unchanged are
reused, and an interrupted one resumes from its last checkpoint, so a rerun of the demo only
does what is missing (``--overwrite`` retrains everything; the rendered data stay cached).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unibct_ray.errors import UserError

__all__ = ["run_demo", "run_chain", "CHAIN_METHODS", "DemoPlan", "demo_plan", "DEMO_CONFIGS", "SCENARIOS", "METHODS", "DEMO_FAR",
           "demo_checks", "write_summary", "start"]

DEMO_CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "synthetic"
SCENARIOS = ("open-class", "open-data", "extended-class", "extended-data")
DEFAULT_METHODS = ("independent", "l2", "bct", "unibct")
# method -> (config file in DEMO_CONFIGS, extra overrides); unibct-column is the refinement
# ablation: the public re-implementation's column softmax (= plain class means).
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "independent": ("new-independent.yaml", ()),
    "l2": ("new-l2.yaml", ()),
    "l2-weak": ("new-l2-weak.yaml", ()),
    "bct": ("new-bct.yaml", ()),
    "unibct": ("new-unibct.yaml", ()),
    "unibct-column": ("new-unibct.yaml", ("compat.axis=column", "name=synthetic-new-unibct-column")),
    "nccl": ("new-nccl.yaml", ()),
    "advbct": ("new-advbct.yaml", ()),
    "mixbct": ("new-mixbct.yaml", ()),
}
DEMO_FAR = "1e-3"  # ~20 impostor pairs per 20k at 1e-3; 1e-4 would rest on two
MARKER = ".unibct-demo"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (the full default or ``--quick``)."""

    identities: int = 1000
    images_per_identity: int = 5
    image_size: int = 32
    eval_identities: int = 100
    epochs: int | None = None         # None: the configs' own
    refine_epochs: tuple[int, ...] | None = None
    bootstrap: int = 200
    split_ratio: float = 0.3
    extra: tuple[str, ...] = field(default_factory=tuple)  # more overrides for every run


def demo_plan(quick: bool, scenario: str = "open-class") -> DemoPlan:
    """The sizes for ``scenario``.

    A data split gives the old model the first ``round(r * n)`` images of each identity, so
    1,000 identities x 2-8 images leave it 1-2 images per identity: too few to learn what
    varies within an identity, and the old model ends near chance (README "The demo"). The
    data-split scenarios therefore render about as many images over fewer identities: 300 x
    8-26, which leaves the old model 2-8 images of each (5 on average, as many as the
    class splits' old model has) and the new models 300 identities to align.
    """
    if quick:
        return DemoPlan(identities=40, images_per_identity=12, eval_identities=40, epochs=3,
                        refine_epochs=(2,), bootstrap=0, extra=("global_batch=32",))
    from unibct_ray.data.splits import DATA_SPLIT_SCENARIOS

    if scenario in DATA_SPLIT_SCENARIOS:
        return DemoPlan(identities=300, images_per_identity=17)
    return DemoPlan()


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _same_config(run_dir: Path, cfg_dict: dict) -> bool:
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(cfg_dict))


def _existing_run(cfg: Any) -> tuple[Path | None, Path | None]:
    """(finished ``final.pt``, run folder to resume) of a run of the same config under its name.

    A folder holding another recipe, or nothing usable, is removed: the run starts over.
    """
    from unibct_ray.checkpoint import find_latest_checkpoint
    from unibct_ray.config import to_dict

    run_dir = (Path(cfg.storage) / cfg.name).resolve()
    if not run_dir.exists():
        return None, None
    if _same_config(run_dir, to_dict(cfg)):
        if (run_dir / "final.pt").is_file():
            _say(f"    {cfg.name}: reusing the finished run in {run_dir}")
            return run_dir / "final.pt", None
        if find_latest_checkpoint(run_dir) is not None:
            _say(f"    {cfg.name}: resuming the interrupted run in {run_dir}")
            return None, run_dir
    shutil.rmtree(run_dir)
    return None, None


def _train_or_reuse(cfg: Any) -> Path:
    """Train ``cfg``; reuse a finished run of the same config, resume an interrupted one."""
    from unibct_ray.distributed.train import train

    final, resume = _existing_run(cfg)
    return final if final is not None else train(cfg, resume=resume).checkpoint


def _train_or_reuse_group(cfgs: list[Any]) -> list[Path]:
    """``_train_or_reuse`` for several runs: whatever is left to train goes into one fit."""
    from unibct_ray.distributed.train import train_group

    out: list[Path | None] = []
    todo, resumes = [], []
    for i, cfg in enumerate(cfgs):
        final, resume = _existing_run(cfg)
        out.append(final)
        if final is None:
            todo.append(i)
            resumes.append(resume)
    if todo:
        for i, r in zip(todo, train_group([cfgs[i] for i in todo], resumes=resumes)):
            out[i] = r.checkpoint
    return out


def _train_by_old_model(cfgs: list[Any]) -> list[Path]:
    """``_train_or_reuse_group`` for runs against different old models: one fit per old
    checkpoint (a group reads one dataset, with one old model's features as a column); the
    ``independent`` runs need none and join the first fit."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        if c.compat.method != "independent":
            groups.setdefault(str(Path(c.compat.old_checkpoint).resolve()), []).append(i)
    free = [i for i, c in enumerate(cfgs) if c.compat.method == "independent"]
    order = list(groups.values()) or [[]]
    order[0] = free + order[0]
    out: list[Path | None] = [None] * len(cfgs)
    for idx in order:
        for i, ckpt in zip(idx, _train_or_reuse_group([cfgs[i] for i in idx])):
            out[i] = ckpt
    return out  # type: ignore[return-value]


def _prepare_data(out: Path, plan: DemoPlan, seed: int, scenarios: list[str],
                  spec: Any = None) -> tuple[Path, dict[str, Path]]:
    """Render + convert + split once per (sizes, seed); returns (synth dir, {scenario: split dir}).

    ``spec``: the ``SynthSpec`` to render (default: the plan's sizes, no training noise); the
    cache is keyed by its settings.
    """
    from unibct_ray.data.shards import atomic_write_text
    from unibct_ray.data.splits import split_shards
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.synth import synthesize

    if spec is None:
        spec = SynthSpec(identities=plan.identities, images_per_identity=plan.images_per_identity,
                         size=plan.image_size, eval_identities=plan.eval_identities, seed=seed)
    key = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = out / "data" / key
    synth, shards = root / "synth", root / "shards"
    if (root / "spec.json").is_file() and (shards / "manifest.json").is_file():
        _say(f"1/5 synthetic data: cached in {root}")
    else:
        _say(f"1/5 rendering the synthetic benchmark into {synth}")
        if root.exists():
            shutil.rmtree(root)
        s = synthesize(spec, synth, progress=False)
        _say(f"    {s['train']['images']} training images of {s['train']['identities']} identities; IJB-C: "
             f"{s['ijbc']['images']} images, {s['ijbc']['templates']} templates, {s['ijbc']['pairs']} pairs")
        m = convert_rec(synth / "train.rec", shards, rows_per_shard=500, progress=False)
        _say(f"    converted train.rec to {m.rows} rows in {len(m.shards)} Parquet shards")
        atomic_write_text(root / "spec.json", json.dumps(spec.to_json(), indent=2, default=str) + "\n")
    splits = {}
    for sc in scenarios:
        d = root / "splits" / sc
        if not (d / "new" / "manifest.json").is_file():
            split_shards(shards, sc, plan.split_ratio, d, progress=False)
        splits[sc] = d
    return synth, splits


def _method_config(method: str, train: Path, runs: Path, old_ckpt: Path, cache: Path, plan: DemoPlan,
                   seed: int, more: tuple[str, ...] = ()) -> Any:
    """The config of ``method``'s new model trained on the shards ``train`` against ``old_ckpt``;
    ``more``: overrides applied last (a chain's later step renames its run)."""
    from unibct_ray.config import load_config

    file, extra = METHODS[method]
    sets = [f"data.train={train}", f"storage={runs}", f"compat.old_checkpoint={old_ckpt}",
            f"compat.old_features_cache={cache}", f"seed={seed}", f"data.image_size={plan.image_size}",
            *extra, *plan.extra]
    if plan.epochs is not None:
        sets.append(f"optim.epochs={plan.epochs}")
    if plan.refine_epochs is not None:
        sets.append(f"compat.refine_epochs=[{', '.join(map(str, plan.refine_epochs))}]")
    return load_config(DEMO_CONFIGS / file, [*sets, *more])


def demo_checks(results: dict[str, dict[str, Any]], far: str = DEMO_FAR) -> list[tuple[str, bool | None]]:
    """The three things the demo should show, each (statement, holds?) at TAR@FAR=``far``.

    (a) every new model beats the old one (self_new > self_old); (b) the independent model
    is incompatible (cross < 0.5 x self_old); (c) UniBCT is compatible (cross > self_old).
    None when the method was not run.
    """
    def tar(method: str, test: str) -> float:
        v = results[method]["verification"][test][far]
        return float("nan") if v is None else float(v)

    news = [m for m in results]
    a = all(tar(m, "self_new") > tar(m, "self_old") for m in news) if news else None
    b = tar("independent", "cross") < 0.5 * tar("independent", "self_old") if "independent" in results else None
    c = tar("unibct", "cross") > tar("unibct", "self_old") if "unibct" in results else None
    return [(f"every new model beats the old one (self_new > self_old at FAR={far})", a),
            (f"independent is incompatible (cross < 0.5 x self_old at FAR={far})", b),
            (f"unibct is compatible (cross > self_old at FAR={far})", c)]


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _table(results: dict[str, dict[str, Any]], far: str = DEMO_FAR, far2: str = "1e-4") -> list[str]:
    """Markdown rows: TARs at ``far``, the same three at ``far2`` beside them (on the demo's
    20k impostor pairs 1e-4 rests on two of them; the science set resolves it), top-1."""
    lines = [f"| method | self_old | self_new | cross | cross - self_old [95% CI] | compatible "
             f"| @{far2} self_old / self_new / cross | top-1 self_old / self_new / cross |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        v, i, d = r["verification"], r["identification"], r.get("difference", {})
        ci = d.get("ci95")
        diff = _fmt(d.get("value")) + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
        top = " / ".join(_fmt(i[t]["top1"]) for t in ("self_old", "self_new", "cross"))
        at2 = " / ".join(_fmt(v[t].get(far2)) for t in ("self_old", "self_new", "cross"))
        lines.append(f"| {m} | {_fmt(v['self_old'][far])} | {_fmt(v['self_new'][far])} | {_fmt(v['cross'][far])} "
                     f"| {diff} | {'yes' if r.get('compatible') else 'no'} | {at2} | {top} |")
    return lines


def _plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path, far: str = DEMO_FAR) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tests = ("self_old", "self_new", "cross")
    colors = {"self_old": "#8c8c8c", "self_new": "#4c72b0", "cross": "#dd8452"}
    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4), squeeze=False)
    for ax, (scenario, results) in zip(axes[0], summary.items()):
        methods = list(results)
        x = np.arange(len(methods))
        for j, t in enumerate(tests):
            vals = [results[m]["verification"][t][far] or 0.0 for m in methods]
            err = None
            ints = [((results[m].get("bootstrap") or {}).get("verification") or {}).get(t, {}).get(far) for m in methods]
            if all(isinstance(c, (list, tuple)) and len(c) == 2 for c in ints):
                err = np.array([[max(v - c[0], 0) for v, c in zip(vals, ints)], [max(c[1] - v, 0) for v, c in zip(vals, ints)]])
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, yerr=err, capsize=2, label=t, color=colors[t])
        ax.set_xticks(x, methods, rotation=20)
        ax.set_title(scenario)
        ax.set_ylabel(f"TAR @ FAR={far}")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_summary(out: Path, summary: dict[str, dict[str, dict[str, Any]]], header: list[str]) -> list[str]:
    """Write summary.json / summary.md / summary.png (atomically); returns the markdown lines."""
    from unibct_ray.data.shards import atomic_write_text

    md = [*header, ""]
    for scenario, results in summary.items():
        md += [f"## {scenario}", "", *_table(results), ""]
        md += [f"- {'yes' if ok else ('n/a' if ok is None else 'NO')}: {text}" for text, ok in demo_checks(results)]
        md.append("")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    _plot(summary, out / "summary.png")
    return md


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"{out}: exists and is not a demo directory (no {MARKER}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("unibct-ray demo output; safe to delete\n")


def _check_choices(scenario: str, methods: list[str] | None, default: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(scenarios, methods) from ``--scenario`` and ``--methods``, each checked."""
    scenarios = list(SCENARIOS) if scenario == "all" else [scenario]
    for sc in scenarios:
        if sc not in SCENARIOS:
            raise UserError(f"--scenario must be one of {', '.join(SCENARIOS)} or all, got {sc!r}")
    methods = list(methods or default)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    if not DEMO_CONFIGS.is_dir():
        raise UserError(f"{DEMO_CONFIGS}: demo configs not found (run from a checkout of the project)")
    return scenarios, methods


def claim(out: Path) -> Path:
    """``out`` resolved and claimed as a demo directory (refused if it holds anything else)."""
    out = Path(out).resolve()
    _check_out(out)
    return out


def connect(address: str | None, num_cpus: int | None, verbose: bool = False) -> None:
    """Connect to Ray, without Ray Data's progress bars (the demo prints a line per phase)."""
    from unibct_ray.distributed.runtime import ensure_ray

    ensure_ray(address, num_cpus=num_cpus, quiet=not verbose)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


def start(out: Path, address: str | None, num_cpus: int | None) -> Path:
    """``claim`` then ``connect``; returns ``out`` resolved."""
    out = claim(out)
    connect(address, num_cpus)
    return out


def _old_config(split: Path, runs: Path, plan: DemoPlan, seed: int) -> Any:
    """The old model's config: ``old.yaml`` on the scenario's old split."""
    from unibct_ray.config import load_config

    sets = [f"data.train={split / 'old'}", f"storage={runs}", f"seed={seed}",
            f"data.image_size={plan.image_size}", *plan.extra]
    if plan.epochs is not None:
        sets.append(f"optim.epochs={plan.epochs}")
    return load_config(DEMO_CONFIGS / "old.yaml", sets)


def run_demo(out: Path, *, scenario: str = "open-class", seed: int = 0, quick: bool = False,
             methods: list[str] | None = None, overwrite: bool = False, address: str | None = None,
             num_cpus: int | None = None, verbose: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the demo into ``out``; returns the summary ``{scenario: {method: report}}``.

    Ray's own log lines go to ``out/logs/ray.log`` (``verbose``: to the console, as Ray prints them).
    """
    return _checked_run(_run, DEFAULT_METHODS, out, scenario, methods, seed=seed, quick=quick,
                        overwrite=overwrite, address=address, num_cpus=num_cpus, verbose=verbose)


def _checked_run(body: Any, default_methods: tuple[str, ...], out: Path, scenario: str, methods: list[str] | None,
                 *, verbose: bool, **kw: Any) -> Any:
    """Check the choices, claim ``out``, then ``body(out, scenarios, methods, ...)`` with Ray's own
    log lines in ``out/logs/ray.log``."""
    from unibct_ray.distributed.console import RUN_LOG, ray_console

    scenarios, methods = _check_choices(scenario, methods, default_methods)
    out = claim(out)
    with ray_console(out / RUN_LOG, verbose):
        return body(out, scenarios, methods, verbose=verbose, **kw)


def _run(out: Path, scenarios: list[str], methods: list[str], *, seed: int, quick: bool, overwrite: bool,
         address: str | None, num_cpus: int | None, verbose: bool) -> dict[str, dict[str, dict[str, Any]]]:
    from unibct_ray.data.ijbc import read_ijbc_meta
    from unibct_ray.distributed.evaluate import EvalArgs, checkpoints_features, run_eval

    plans = {sc: demo_plan(quick, sc) for sc in scenarios}
    t0 = time.perf_counter()
    connect(address, num_cpus, verbose)

    tag = f"seed-{seed}" + ("-quick" if quick else "")
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    for sc in scenarios:
        plan = plans[sc]
        synth, splits = _prepare_data(out, plan, seed, [sc])  # rendered once per set of sizes, then cached
        t_sc = time.perf_counter()
        split = splits[sc]
        base = out / sc / tag
        runs, evals = base / "runs", base / "eval"
        if overwrite and base.exists():
            shutil.rmtree(base)
        _say(f"2/5 [{sc}] split (r = {plan.split_ratio}) in {split}")
        old_cfg = _old_config(split, runs, plan, seed)
        _say(f"3/5 [{sc}] training the old model ({old_cfg.model.backbone}, {old_cfg.optim.epochs} epochs, "
             f"{old_cfg.num_workers} Ray Train workers)")
        old_ckpt = _train_or_reuse(old_cfg)
        cfgs = [_method_config(m, split / "new", runs, old_ckpt, out / "cache" / "old-features", plan, seed) for m in methods]
        for i, (m, cfg) in enumerate(zip(methods, cfgs), 1):
            extra = f", refinement at epochs {list(cfg.compat.refine_epochs)}" if cfg.compat.method == "unibct" else ""
            _say(f"4/5 [{sc}] new model {i}/{len(methods)}: {m} ({cfg.optim.epochs} epochs{extra})")
        _say(f"    the {len(methods)} new models train one after the other in one Ray Train fit")
        new_ckpts = dict(zip(methods, _train_or_reuse_group(cfgs)))
        _say(f"5/5 [{sc}] evaluating: self_old, self_new, cross on the synthetic IJB-C")
        # Every model's IJB-C features in one pass of one actor pool; the evaluations read them.
        ijbc_cache = out / "cache" / "ijbc-features"
        checkpoints_features(read_ijbc_meta(synth), [old_ckpt, *new_ckpts.values()], ijbc_cache, EvalArgs.actors)
        results: dict[str, dict[str, Any]] = {}
        for m in methods:
            if (evals / m).exists():
                shutil.rmtree(evals / m)  # the demo's own report; the feature cache stays
            results[m] = run_eval(EvalArgs(ijbc=synth, out=evals / m, old_checkpoint=old_ckpt, new_checkpoint=new_ckpts[m],
                                           criterion_far=float(DEMO_FAR), bootstrap=plan.bootstrap, seed=seed,
                                           cache_dir=ijbc_cache))
            v = results[m]["verification"]
            _say(f"    {m}: TAR@FAR={DEMO_FAR} self_old {_fmt(v['self_old'][DEMO_FAR])}  "
                 f"self_new {_fmt(v['self_new'][DEMO_FAR])}  cross {_fmt(v['cross'][DEMO_FAR])}")
        summary[sc] = results
        timings[sc] = time.perf_counter() - t_sc

    header = [f"# unibct-ray demo ({'quick, ' if quick else ''}seed {seed})", "",
              *[f"Synthetic data, {sc}: {asdict(plans[sc])}." for sc in scenarios], "",
              f"TAR at FAR={DEMO_FAR} on the synthetic IJB-C (1:1); cross = old gallery/enrolment vs new probe. "
              "Intervals: 95% subject bootstrap of the difference." if any(p.bootstrap for p in plans.values()) else
              f"TAR at FAR={DEMO_FAR} on the synthetic IJB-C (1:1); bootstrap off (--quick).", "",
              "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."]
    md = write_summary(out, summary, header)
    print("\n".join(md[len(header):]), flush=True)
    _say(f"done in {time.perf_counter() - t0:.0f} s: {out / 'summary.md'}, summary.json, summary.png")
    return summary


CHAIN_METHODS = ("independent", "bct", "unibct")
CHAIN_STEPS = ("v1", "v2", "v3")


def _chain_markdown(header: list[str], matrices: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    from unibct_ray.metrics.matrix import matrix_markdown

    md = [*header, ""]
    for sc, per_method in matrices.items():
        for m, matrix in per_method.items():
            md += matrix_markdown(matrix, far=DEMO_FAR, title=f"{sc}: {m} (v1 -> v2 -> v3)")
            md.append("")
    return md


def _chain_plot(matrices: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """One heat-map per (scenario, method): 1:1 TAR at DEMO_FAR of every (query, gallery)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unibct_ray.atomic import atomic_write
    from unibct_ray.metrics.matrix import draw_matrix

    panels = [(sc, m, mx) for sc, per in matrices.items() for m, mx in per.items()]
    fig = Figure(figsize=(4.0 * len(panels) + 0.8, 3.9), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (sc, m, mx) in zip(axes, panels):
        im = draw_matrix(ax, mx, far=DEMO_FAR, title=f"{m} ({sc})\n1:1 TAR @ FAR={DEMO_FAR}")
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def run_chain(out: Path, *, scenario: str = "open-class", seed: int = 0, quick: bool = False,
              methods: list[str] | None = None, overwrite: bool = False, address: str | None = None,
              num_cpus: int | None = None, verbose: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """``unibct-ray demo --chain``: two upgrades in a row, v1 -> v2 -> v3, per method.

    v1 is the demo's old model (the scenario's old split); v2 is the method's new model on the
    new split, compatible with v1 (the demo's own new model: a finished demo run is reused);
    v3 trains on the whole training set (every identity: each release sees more data),
    compatible with v2 only, by the same method. The IJB-C features of every model come from
    one extraction pass; then each method's matrix (every query model against every older or
    equal gallery model, 1:1 and 1:N) is scored. Writes ``DIR/chain.md`` (the matrices as
    tables), ``DIR/chain.png`` (a heat-map per method), ``DIR/chain.json``, and each
    method's matrix and pair reports under ``DIR/<scenario>/<tag>/chain/<method>/``.

    Returns ``{scenario: {method: matrix}}`` (:func:`unibct_ray.metrics.matrix.evaluate_matrix`).
    Ray's own log lines go to ``out/logs/ray.log``, as with the demo.
    """
    return _checked_run(_run_chain, CHAIN_METHODS, out, scenario, methods, seed=seed, quick=quick,
                        overwrite=overwrite, address=address, num_cpus=num_cpus, verbose=verbose)


def _run_chain(out: Path, scenarios: list[str], methods: list[str], *, seed: int, quick: bool, overwrite: bool,
               address: str | None, num_cpus: int | None, verbose: bool) -> dict[str, dict[str, dict[str, Any]]]:
    from unibct_ray.data.ijbc import read_ijbc_meta
    from unibct_ray.data.shards import atomic_write_text
    from unibct_ray.distributed.evaluate import EvalArgs, checkpoints_features
    from unibct_ray.metrics.matrix import evaluate_matrix, write_matrix

    t0 = time.perf_counter()
    connect(address, num_cpus, verbose)
    tag = f"seed-{seed}" + ("-quick" if quick else "")
    matrices: dict[str, dict[str, dict[str, Any]]] = {}
    plans = {sc: demo_plan(quick, sc) for sc in scenarios}
    for sc in scenarios:
        plan = plans[sc]
        synth, splits = _prepare_data(out, plan, seed, [sc])
        split, whole = splits[sc], splits[sc].parent.parent / "shards"
        base = out / sc / tag
        runs = base / "runs"
        if overwrite and base.exists():
            shutil.rmtree(base)
        cache = out / "cache" / "old-features"
        _say(f"2/5 [{sc}] v1: the old model on the old split ({split / 'old'})")
        v1 = _train_or_reuse(_old_config(split, runs, plan, seed))
        _say(f"3/5 [{sc}] v2 of {', '.join(methods)}: the new split, each compatible with v1 (one Ray Train fit)")
        v2_cfgs = [_method_config(m, split / "new", runs, v1, cache, plan, seed) for m in methods]
        v2 = dict(zip(methods, _train_or_reuse_group(v2_cfgs)))
        _say(f"4/5 [{sc}] v3 of {', '.join(methods)}: every training identity ({whole}), each compatible "
             "with its v2 (a Ray Train fit per v2)")
        v3_cfgs = [_method_config(m, whole, runs, v2[m], cache, plan, seed, (f"name={c.name}-v3",))
                   for m, c in zip(methods, v2_cfgs)]
        v3 = dict(zip(methods, _train_by_old_model(v3_cfgs)))
        _say(f"5/5 [{sc}] the compatibility matrix of each chain on the synthetic IJB-C")
        meta = read_ijbc_meta(synth)
        ckpts = [v1, *v2.values(), *v3.values()]
        feats = dict(zip(map(str, ckpts), checkpoints_features(meta, ckpts, out / "cache" / "ijbc-features",
                                                               EvalArgs.actors)))
        matrices[sc] = {}
        for m in methods:
            chain = {"v1": feats[str(v1)], "v2": feats[str(v2[m])], "v3": feats[str(v3[m])]}
            mx, pair_runs = evaluate_matrix(meta, chain, list(CHAIN_STEPS), criterion_far=float(DEMO_FAR),
                                            bootstrap=plan.bootstrap, seed=seed)
            mx["sources"] = {"v1": str(v1), "v2": str(v2[m]), "v3": str(v3[m])}
            where = base / "chain" / m
            if where.exists():
                shutil.rmtree(where)  # the demo's own report; checkpoints and features stay
            write_matrix(mx, where, pair_runs, title=f"{m}: v1 -> v2 -> v3 ({sc})")
            matrices[sc][m] = mx
            cells = {(c["query"], c["gallery"]): c for c in mx["cells"]}
            _say(f"    {m}: " + ", ".join(f"{q}->{g} {'yes' if cells[q, g]['compatible'] else 'no'}"
                                       for q, g in (("v2", "v1"), ("v3", "v2"), ("v3", "v1"))))
    header = [f"# unibct-ray demo --chain ({'quick, ' if quick else ''}seed {seed})", "",
              "v1: the old model (old split); v2: each method's new model (new split), compatible with v1; "
              "v3: every training identity, compatible with v2 only, by the same method.",
              f"1:1 TAR at FAR={DEMO_FAR} and 1:N top-1 on the synthetic IJB-C; a pair (query, gallery) is "
              "compatible when cross(query, gallery) > self(gallery)"
              + (" and the 95% subject-bootstrap interval of the difference is above 0." if any(
                  p.bootstrap for p in plans.values()) else " (bootstrap off with --quick)."), ""]
    md = _chain_markdown(header, matrices)
    atomic_write_text(out / "chain.json", json.dumps(matrices, indent=2) + "\n")
    atomic_write_text(out / "chain.md", "\n".join(md) + "\n")
    _chain_plot(matrices, out / "chain.png")
    print("\n".join(md[len(header):]), flush=True)
    _say(f"done in {time.perf_counter() - t0:.0f} s: {out / 'chain.md'}, chain.png, chain.json")
    return matrices


def aggregate(summaries: list[dict[str, dict[str, dict[str, Any]]]], far: str = DEMO_FAR) -> list[str]:
    """Mean ± spread over seeds of TAR@FAR (self_old / self_new / cross) per scenario and method.

    ``summaries`` are several ``summary.json`` contents (one per seed). Spread = (max - min) / 2,
    so "mean ± spread" spans every seed; ``n`` counts the seeds that ran the method. The last
    column counts the seeds where cross > self_old.
    """
    import numpy as np

    lines = [f"| scenario | method | n | self_old | self_new | cross | cross > self_old |", "|---|---|---|---|---|---|---|"]
    scenarios = list(dict.fromkeys(sc for s in summaries for sc in s))
    for sc in scenarios:
        methods = list(dict.fromkeys(m for s in summaries for m in s.get(sc, {})))
        for m in methods:
            reps = [s[sc][m] for s in summaries if m in s.get(sc, {})]
            cells = []
            for t in ("self_old", "self_new", "cross"):
                v = np.array([np.nan if r["verification"][t][far] is None else r["verification"][t][far] for r in reps])
                cells.append(f"{np.nanmean(v):.3f} ± {(np.nanmax(v) - np.nanmin(v)) / 2:.3f}")
            wins = sum(1 for r in reps if (r["verification"]["cross"][far] or 0) > (r["verification"]["self_old"][far] or 0))
            lines.append(f"| {sc} | {m} | {len(reps)} | {' | '.join(cells)} | {wins}/{len(reps)} |")
    return lines


def _aggregate_main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m unibct_ray.demo",
                                description="Mean ± spread table over several demo summary.json files (one per seed).")
    p.add_argument("summaries", nargs="+", type=Path, help="DIR/summary.json of each seed")
    a = p.parse_args(argv)
    loaded = []
    for f in a.summaries:
        try:
            loaded.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{f}: not a readable summary.json ({e})")
    print("\n".join(aggregate(loaded)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_aggregate_main())
