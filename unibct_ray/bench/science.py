"""The science run: compatibility methods compared over seeds on noisy data, resolved at FAR=1e-4.

``unibct-ray bench science --out DIR`` (``--quick``: the small form the tests run) renders a
training set with controlled noise (label noise, outliers, power-law class sizes: ``data
synth --label-noise --outliers --long-tail``) and the science IJB-C
(:data:`unibct_ray.data.synth.SCIENCE_IJBC`: 2,000 subjects, 10k genuine and 1M impostor
template pairs, so TAR@FAR=1e-4 rests on 100 impostor pairs), splits it for ``--scenario``
(default extended-class: the new model sees more identities than the old one), trains the
old model once (``tiny``) and, for each seed, one new model per method with a stronger
backbone (``small``: twice tiny's depth, as r18 -> r50), the new models of a seed in one Ray Train fit,
then evaluates every new model against the old one on the science IJB-C.

It reports per method the mean +- sd over seeds of self_old, self_new and cross at FAR 1e-4
and 1e-3 and top-1 (1:N), and paired comparisons of ``unibct`` against ``bct`` and ``l2``:
per seed the difference of cross (and of cross - self_old), its mean and a paired t 95%
interval over seeds. ``--weights`` adds a trade-off view: cross against self_new over the
compatibility weight (multiples of each method's configured weight), seed ``seeds[0]``.
``--chain`` adds multi-step upgrades: per method and seed a v3 trained on every training
identity against that seed's new model (v2), and the v1 -> v2 -> v3 compatibility matrix
(:mod:`unibct_ray.metrics.matrix`), summarised per pair over seeds.

Everything reuses the demo's machinery (:mod:`unibct_ray.demo`): the configs in
``jobs/configs/synthetic``, cached data, finished runs reused and interrupted ones resumed
(rerun the same command after an interruption), the grouped fit, one feature pass for all
checkpoints. Output: ``DIR/science.json``, ``DIR/science.md``, ``DIR/science.png`` (per method
the three tests at 1e-4 and 1e-3, each seed a dot) and, with a sweep, ``DIR/tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SciencePlan", "science_plan", "paired_t", "aggregate_seeds", "plot_science", "run_science", "add_arguments", "run",
           "DESCRIPTION", "FARS"]

DESCRIPTION = __doc__
FARS = ("1e-4", "1e-3")
TESTS = ("self_old", "self_new", "cross")
DEFAULT_METHODS = ("independent", "l2", "bct", "unibct")
COMPARE_AGAINST = ("bct", "l2")


@dataclass(frozen=True)
class SciencePlan:
    """Sizes of one science run (full or ``--quick``)."""

    identities: int = 1000
    images_per_identity: int = 8
    long_tail: float = 0.5  # sizes 4..129 around the mean 8 (MS1M: ~55 around, max ~600)
    label_noise: float = 0.1
    outliers: float = 0.1
    image_size: int = 32
    ijbc: dict[str, int] = field(default_factory=lambda: {
        "eval_identities": 2000, "gallery_images": 2, "probes_per_identity": 5, "video_frames": 3,
        "impostor_pairs": 1_000_000})
    old_backbone: str = "tiny"
    new_backbone: str = "small"
    epochs: int | None = 10  # None: the configs' own (12)
    refine_epochs: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    weights: tuple[float, ...] = ()  # trade-off sweep: multiples of each method's weight
    extra: tuple[str, ...] = ()
    split_ratio: float = 0.3


def science_plan(quick: bool) -> SciencePlan:
    """The full plan or the quick one.

    Full, estimated from measured CPU costs at 32 px (training 2.9 ms per image for ``tiny``,
    3.7 ms for ``small``; embedding 0.9 ms per image, flip included twice; rendering the
    science IJB-C ~4 ms per image): 20 new models x 10 epochs x 8,000 images = 5,900 CPU-s,
    the old model ~70 CPU-s, IJB-C features of 21 models x 44k images x 2 ~1,700 CPU-s,
    rendering ~200 CPU-s: about 65 minutes on 2 cores, plus Ray's fixed costs. The weight
    sweep (``--weights 0.3 3``) adds 6 models, about 20 minutes.
    """
    if quick:
        return SciencePlan(identities=40, images_per_identity=12, long_tail=0.5, label_noise=0.2, outliers=0.1,
                           ijbc={"eval_identities": 40, "gallery_images": 2, "probes_per_identity": 3,
                                 "video_frames": 3, "impostor_pairs": 4000},
                           epochs=3, refine_epochs=(2,), seeds=(0, 1), weights=(0.3,), extra=("global_batch=32",))
    return SciencePlan()


def _say(msg: str) -> None:
    print(f"[science] {msg}", flush=True)


def paired_t(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences and its t interval over seeds: ``mean +- t_{n-1} sd / sqrt(n)``.

    ``ci95`` is None with fewer than two seeds.
    """
    import numpy as np
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], dtype=np.float64)
    out: dict[str, Any] = {"n": int(d.size), "mean": float(d.mean()) if d.size else None, "ci95": None,
                           "diffs": [round(float(x), 4) for x in d]}
    if d.size >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def _value(rep: dict, test: str, metric: str) -> float:
    if metric == "top1":
        v = rep["identification"][test]["top1"]
    else:
        v = rep["verification"][test][metric]
    return float("nan") if v is None else float(v)


def aggregate_seeds(reports: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """``{method: {seed: report}}`` -> per method mean/sd per test and metric, and the paired comparisons.

    Paired: for each of :data:`COMPARE_AGAINST` present, per seed ``unibct - other`` of cross
    at each FAR, of cross - self_old at each FAR, and of self_new at 1e-4.
    """
    import numpy as np

    methods: dict[str, Any] = {}
    for m, by_seed in reports.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for t in TESTS:
            for metric in (*FARS, "top1"):
                v = np.array([_value(r, t, metric) for r in by_seed.values()])
                row[f"{t}@{metric}"] = {"mean": float(np.nanmean(v)),
                                        "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}
        methods[m] = row
    paired: dict[str, Any] = {}
    if "unibct" in reports:
        for other in COMPARE_AGAINST:
            if other not in reports:
                continue
            seeds = sorted(set(reports["unibct"]) & set(reports[other]))
            u, o = reports["unibct"], reports[other]
            cmp: dict[str, Any] = {}
            for far in FARS:
                cmp[f"cross@{far}"] = paired_t([_value(u[s], "cross", far) - _value(o[s], "cross", far) for s in seeds])
                cmp[f"cross-self_old@{far}"] = paired_t(
                    [(_value(u[s], "cross", far) - _value(u[s], "self_old", far))
                     - (_value(o[s], "cross", far) - _value(o[s], "self_old", far)) for s in seeds])
            cmp["self_new@1e-4"] = paired_t([_value(u[s], "self_new", "1e-4") - _value(o[s], "self_new", "1e-4")
                                             for s in seeds])
            paired[f"unibct-vs-{other}"] = cmp
    return {"methods": methods, "paired": paired}


def _fmt(x: dict[str, float]) -> str:
    return f"{x['mean']:.3f} ± {x['sd']:.3f}"


def _ci(p: dict[str, Any]) -> str:
    if p["mean"] is None:
        return "n/a"
    ci = p["ci95"]
    return f"{p['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (one seed: no interval)")


def science_markdown(result: dict[str, Any]) -> list[str]:
    """The tables of ``science.md``."""
    agg = result["aggregate"]
    lines = [f"# unibct-ray science run ({result['scenario']}{', quick' if result['quick'] else ''})", "",
             f"Training data: {result['train']}. Evaluation: {result['ijbc']}.", "",
             f"Mean ± sd over seeds {result['seeds']}; cross = old gallery/enrolment vs new probe.", ""]
    for far in FARS:
        lines += [f"| method | self_old @{far} | self_new @{far} | cross @{far} |", "|---|---|---|---|"]
        lines += [f"| {m} | " + " | ".join(_fmt(r[f"{t}@{far}"]) for t in TESTS) + " |" for m, r in agg["methods"].items()]
        lines.append("")
    lines += ["| method | top-1 self_old | top-1 self_new | top-1 cross |", "|---|---|---|---|"]
    lines += [f"| {m} | " + " | ".join(_fmt(r[f"{t}@top1"]) for t in TESTS) + " |" for m, r in agg["methods"].items()]
    lines.append("")
    if agg["paired"]:
        lines += ["Paired over seeds (unibct minus the other; mean [95% paired t interval]):", "",
                  "| comparison | cross @1e-4 | cross @1e-3 | (cross - self_old) @1e-4 | self_new @1e-4 |",
                  "|---|---|---|---|---|"]
        for name, c in agg["paired"].items():
            lines.append(f"| {name} | {_ci(c['cross@1e-4'])} | {_ci(c['cross@1e-3'])} | "
                         f"{_ci(c['cross-self_old@1e-4'])} | {_ci(c['self_new@1e-4'])} |")
        lines.append("")
    if result.get("tradeoff"):
        lines += ["Trade-off (seed %d): compatibility weight (x the config's) -> self_new / cross @1e-4:" % result["seeds"][0],
                  "", "| method | weight x | self_new @1e-4 | cross @1e-4 |", "|---|---|---|---|"]
        for m, pts in result["tradeoff"].items():
            lines += [f"| {m} | {p['factor']:g} | {p['self_new']:.3f} | {p['cross']:.3f} |" for p in pts]
        lines.append("")
    if result.get("chain"):
        lines += ["Multi-step upgrades: v1 (the old model) -> v2 (each seed's new model) -> v3 (every training "
                  "identity, compatible with v2 only); per pair, cross(query, gallery) - self(gallery) @1e-4, "
                  "mean [95% paired t interval] over seeds, and the seeds where the pair is compatible:", "",
                  "| method | v2 -> v1 | v3 -> v2 | v3 -> v1 |", "|---|---|---|---|"]
        for m, pairs in result["chain"].items():
            lines.append(f"| {m} | " + " | ".join(f"{_ci(pairs[p]['diff@1e-4'])} ({pairs[p]['compatible']}/"
                                                   f"{pairs[p]['seeds']})" for p in CHAIN_PAIRS) + " |")
        lines.append("")
    lines.append(f"Wall time {result['seconds']:.0f} s.")
    return lines


CHAIN_PAIRS = ("v2 -> v1", "v3 -> v2", "v3 -> v1")


def _train_chain(methods: Sequence[str], seeds: Sequence[int], ckpts: dict[str, Path], v2_cfgs: dict[str, Any],
                 split: Path, runs: Path, cache: Path, dplan: Any, scenario: str) -> dict[str, Path]:
    """Each (method, seed)'s v3: every training identity, compatible with that seed's v2 by the
    same method; a Ray Train fit per v2 (``independent`` joins one). ``ckpts``/``v2_cfgs``: the
    v2 checkpoints and configs by "<method>/seed-<s>". Returns {"<method>/seed-<s>": v3 checkpoint}."""
    from unibct_ray.demo import _method_config, _train_by_old_model

    whole = split.parent.parent / "shards"
    _say(f"[{scenario}] chain: a v3 per method and seed on every training identity ({whole}), each "
         "compatible with its v2")
    v3: dict[str, Path] = {}
    for s in seeds:
        keys = [f"{m}/seed-{s}" for m in methods]
        cfgs = []
        for m, k in zip(methods, keys):
            cfgs.append(_method_config(m, whole, runs / f"seed-{s}", ckpts[k], cache / "old-features", dplan, s,
                                       (f"name={v2_cfgs[k].name}-v3",)))
        v3.update(zip(keys, _train_by_old_model(cfgs)))
    return v3


def _score_chains(meta: Any, methods: Sequence[str], seeds: Sequence[int], v1: Path, v2: dict[str, Path],
                  v3: dict[str, Path], feature_cache: Path, out: Path) -> dict[str, dict[str, Any]]:
    """The matrix of each (method, seed) chain (written under ``out/<method>/seed-<s>/``), then
    per method and pair the difference cross - self(gallery) at 1e-4 over seeds (paired t
    interval) and the number of seeds where the pair is compatible."""
    from unibct_ray.distributed.evaluate import checkpoint_features
    from unibct_ray.metrics.matrix import evaluate_matrix, write_matrix

    def feats(ckpt: Path) -> Any:  # cached by the pass before: a file read
        return checkpoint_features(meta, ckpt, feature_cache, 1)

    old = feats(v1)
    summary: dict[str, dict[str, Any]] = {}
    for m in methods:
        diffs: dict[str, list[float]] = {p: [] for p in CHAIN_PAIRS}
        wins = dict.fromkeys(CHAIN_PAIRS, 0)
        for s in seeds:
            k = f"{m}/seed-{s}"
            mx, runs = evaluate_matrix(meta, {"v1": old, "v2": feats(v2[k]), "v3": feats(v3[k])}, ["v1", "v2", "v3"],
                                       criterion_far=1e-4, seed=s)
            write_matrix(mx, out / m / f"seed-{s}", runs, title=f"{m}, seed {s}: v1 -> v2 -> v3")
            for c in mx["cells"]:
                p = f"{c['query']} -> {c['gallery']}"
                diffs[p].append(c["difference"]["value"])
                wins[p] += bool(c["compatible"])
        summary[m] = {p: {"diff@1e-4": paired_t(diffs[p]), "compatible": wins[p], "seeds": len(seeds)}
                      for p in CHAIN_PAIRS}
    return summary


def _plot_tradeoff(tradeoff: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for m, pts in tradeoff.items():
        ax.plot([p["self_new"] for p in pts], [p["cross"] for p in pts], marker="o", label=m)
        for p in pts:
            ax.annotate(f"x{p['factor']:g}", (p["self_new"], p["cross"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("self_new TAR @ FAR=1e-4")
    ax.set_ylabel("cross TAR @ FAR=1e-4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_science(result: dict[str, Any], path: Path, fars: Sequence[str] = ("1e-4", "1e-3")) -> None:
    """``science.png``: per method, self_old, self_new and cross TAR at each of ``fars`` (a
    panel each): every seed as a dot, the mean as a bar with +- 1 sd. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(result["per_seed"])
    fig = Figure(figsize=(3.4 * len(fars) + 0.6, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(fars), sharey=True, squeeze=False)[0]
    colors = {"self_old": "#7f7f7f", "self_new": "#1f77b4", "cross": "#d62728"}
    width = 0.26
    top = 0.0
    for ax, far in zip(axes, fars):
        for i, m in enumerate(methods):
            per = result["per_seed"][m]
            for j, t in enumerate(TESTS):
                vals = [per[s][f"{t}@{far}"] for s in per]
                x = i + (j - 1) * width
                agg = result["aggregate"]["methods"][m][f"{t}@{far}"]
                ax.bar(x, agg["mean"], width * 0.9, yerr=agg["sd"], color=colors[t], alpha=0.35, capsize=2,
                       label=t if i == 0 else None)
                ax.plot([x] * len(vals), vals, "o", ms=2.5, color=colors[t])
                top = max(top, agg["mean"] + agg["sd"], *vals)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"TAR @ FAR={far}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"TAR (dots: {len(result['seeds'])} seeds; bars: mean +- sd)", fontsize=8)
    axes[0].set_ylim(0.0, 1.25 * top if top > 0 else 1.0)  # room above the bars for the legend
    axes[0].legend(fontsize=7, loc="upper center", ncol=3)
    fig.suptitle(f"science run, {result['scenario']}: cross = old gallery vs new probe", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def _eval(synth: Path, out: Path, old: Path, new: Path, seed: int, cache: Path) -> dict:
    """Evaluate one new model against the old one; a report newer than the checkpoint is reused."""
    from unibct_ray.distributed.evaluate import EvalArgs, run_eval

    report = out / "report.json"
    if report.is_file() and report.stat().st_mtime >= new.stat().st_mtime and report.stat().st_mtime >= old.stat().st_mtime:
        try:
            return json.loads(report.read_text())
        except ValueError:
            pass  # a torn report: evaluate again
    # A stale or torn report goes first: ``overwrite`` would also discard the cached features
    # that the pass before this one computed for every checkpoint, and embed them again.
    report.unlink(missing_ok=True)
    return run_eval(EvalArgs(ijbc=synth, out=out, old_checkpoint=old, new_checkpoint=new, criterion_far=1e-4,
                             bootstrap=0, seed=seed, cache_dir=cache))


def run_science(out: Path, *, scenario: str = "extended-class", quick: bool = False,
                methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                weights: Sequence[float] | None = None, address: str | None = None,
                num_cpus: int | None = None, chain: bool = False) -> dict[str, Any]:
    """Run (or resume) the science run into ``out``; returns the result written to ``science.json``."""
    from dataclasses import replace

    from unibct_ray.config import load_config
    from unibct_ray.data.ijbc import read_ijbc_meta
    from unibct_ray.data.shards import atomic_write_text
    from unibct_ray.data.splits import SCENARIOS
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.demo import (DEMO_CONFIGS, METHODS, DemoPlan, _method_config, _prepare_data, _train_or_reuse,
                                 _train_or_reuse_group, start)
    from unibct_ray.distributed.evaluate import EvalArgs, checkpoints_features
    from unibct_ray.errors import UserError

    if scenario not in SCENARIOS:
        raise UserError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    plan = science_plan(quick)
    if seeds is not None:
        plan = replace(plan, seeds=tuple(seeds))
    if weights is not None:
        plan = replace(plan, weights=tuple(weights))
    if not plan.seeds:
        raise UserError("--seeds: at least one seed")
    if any(w <= 0 for w in plan.weights):
        raise UserError(f"--weights must be > 0, got {list(plan.weights)}")
    t0 = time.perf_counter()
    out = start(out, address, num_cpus)

    spec = SynthSpec(identities=plan.identities, images_per_identity=plan.images_per_identity, size=plan.image_size,
                     long_tail=plan.long_tail, label_noise=plan.label_noise, outliers=plan.outliers, seed=0,
                     **plan.ijbc)
    spec.validate()
    dplan = DemoPlan(identities=plan.identities, images_per_identity=plan.images_per_identity,
                     image_size=plan.image_size, epochs=plan.epochs, refine_epochs=plan.refine_epochs,
                     bootstrap=0, split_ratio=plan.split_ratio,
                     extra=(*plan.extra, f"model.backbone={plan.new_backbone}"))
    _say(f"data: {plan.identities} identities (long tail {plan.long_tail}, label noise {plan.label_noise}, "
         f"outliers {plan.outliers}); IJB-C {plan.ijbc}")
    synth, splits = _prepare_data(out, dplan, 0, [scenario], spec=spec)
    split = splits[scenario]
    tag = "quick" if quick else "full"
    runs, evals, cache = out / scenario / tag / "runs", out / scenario / tag / "eval", out / "cache"
    sets = [f"data.train={split / 'old'}", f"storage={runs}", "seed=0", f"data.image_size={plan.image_size}",
            f"model.backbone={plan.old_backbone}", *plan.extra]
    if plan.epochs is not None:
        sets.append(f"optim.epochs={plan.epochs}")
    old_cfg = load_config(DEMO_CONFIGS / "old.yaml", sets)
    _say(f"[{scenario}] old model ({plan.old_backbone}, {old_cfg.optim.epochs} epochs)")
    old_ckpt = _train_or_reuse(old_cfg)

    # One Ray Train fit per seed (the runs of a fit share their data order and seed): every
    # method of that seed, and the weight sweep with the first seed.
    groups: dict[int, list[tuple[str, Any]]] = {s: [] for s in plan.seeds}  # seed -> [(key, config)]
    for s in plan.seeds:
        for m in methods:
            groups[s].append((f"{m}/seed-{s}", _method_config(m, split / "new", runs / f"seed-{s}", old_ckpt,
                                                              cache / "old-features", dplan, s)))
    sweep_methods = [m for m in methods if m != "independent"]
    for f in plan.weights:
        for m in sweep_methods:
            base = _method_config(m, split / "new", runs, old_ckpt, cache / "old-features", dplan, plan.seeds[0])
            w_plan = replace(dplan, extra=(*dplan.extra, f"compat.weight={base.compat.weight * f:g}"))
            groups[plan.seeds[0]].append((f"{m}/weight-x{f:g}", _method_config(
                m, split / "new", runs / f"weight-x{f:g}", old_ckpt, cache / "old-features", w_plan, plan.seeds[0])))
    n_jobs = sum(map(len, groups.values()))
    _say(f"[{scenario}] {n_jobs} new models ({plan.new_backbone}): {len(methods)} methods x {len(plan.seeds)} seeds"
         + (f" + a weight sweep x{list(plan.weights)}" if plan.weights else "") + ", one Ray Train fit per seed")
    ckpts: dict[str, Path] = {}
    for s, jobs in groups.items():
        ckpts.update(zip([k for k, _ in jobs], _train_or_reuse_group([c for _, c in jobs])))
    v2_cfgs = {k: c for jobs in groups.values() for k, c in jobs}
    v3 = _train_chain(methods, plan.seeds, ckpts, v2_cfgs, split, runs, cache, dplan, scenario) if chain else {}

    _say(f"[{scenario}] features of {1 + len(ckpts) + len(v3)} models on the IJB-C, then the evaluations")
    meta = read_ijbc_meta(synth)
    checkpoints_features(meta, [old_ckpt, *ckpts.values(), *v3.values()], cache / "ijbc-features", EvalArgs.actors)
    reports: dict[str, dict[int, dict]] = {m: {} for m in methods}
    tradeoff: dict[str, list[dict]] = {m: [] for m in sweep_methods} if plan.weights else {}
    for key, ckpt in ckpts.items():
        m, which = key.split("/")
        rep = _eval(synth, evals / m / which, old_ckpt, ckpt, plan.seeds[0], cache / "ijbc-features")
        if which.startswith("seed-"):
            reports[m][int(which[5:])] = rep
        else:
            f = float(which[len("weight-x"):])
            tradeoff[m].append({"factor": f, "self_new": _value(rep, "self_new", "1e-4"),
                                "cross": _value(rep, "cross", "1e-4")})
    if tradeoff:  # the configured weight (x1) is the seed-0 run
        for m in sweep_methods:
            r = reports[m][plan.seeds[0]]
            tradeoff[m].append({"factor": 1.0, "self_new": _value(r, "self_new", "1e-4"),
                                "cross": _value(r, "cross", "1e-4")})
            tradeoff[m].sort(key=lambda p: p["factor"])
    v = meta.pair_labels
    result: dict[str, Any] = {
        "scenario": scenario, "quick": quick, "seeds": list(plan.seeds), "methods": methods,
        "plan": asdict(plan),
        "train": {k: getattr(spec, k) for k in ("identities", "images_per_identity", "long_tail", "label_noise",
                                                 "outliers", "size")},
        "ijbc": {"subjects": plan.ijbc["eval_identities"], "images": len(meta.image_names),
                 "genuine_pairs": int((v == 1).sum()), "impostor_pairs": int((v == 0).sum())},
        "aggregate": aggregate_seeds(reports),
        "tradeoff": tradeoff,
        "per_seed": {m: {str(s): {f"{t}@{far}": _value(r, t, far) for t in TESTS for far in (*FARS, "top1")}
                         for s, r in by.items()} for m, by in reports.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if chain:
        result["chain"] = _score_chains(meta, methods, plan.seeds, old_ckpt, ckpts, v3, cache / "ijbc-features",
                                        out / scenario / tag / "chain")
        result["seconds"] = round(time.perf_counter() - t0, 1)
    md = science_markdown(result)
    atomic_write_text(out / "science.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "science.md", "\n".join(md) + "\n")
    plot_science(result, out / "science.png")
    if tradeoff:
        _plot_tradeoff(tradeoff, out / "tradeoff.png")
    print("\n".join(md), file=sys.stderr, flush=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unibct_ray.data.splits import SCENARIOS

    p.add_argument("--out", type=Path, required=True, help="output directory (reused: finished runs are kept)")
    p.add_argument("--scenario", default="extended-class", choices=SCENARIOS)
    p.add_argument("--quick", action="store_true", help="the small form (40 identities, 3 epochs, 2 seeds)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds of the new models (default 0-4)")
    p.add_argument("--weights", type=float, nargs="*", default=None,
                   help="trade-off sweep: multiples of each method's compatibility weight (empty: none)")
    p.add_argument("--chain", action="store_true",
                   help="multi-step upgrades too: per method and seed a v3 on every training identity, "
                        "compatible with that seed's new model, and the v1 -> v2 -> v3 matrix")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")


def run(a: argparse.Namespace) -> dict:
    res = run_science(a.out, scenario=a.scenario, quick=a.quick, methods=a.methods, seeds=a.seeds, weights=a.weights,
                      address=a.address, num_cpus=a.num_cpus, chain=a.chain)
    keep = ("scenario", "quick", "seeds", "ijbc", "aggregate", "tradeoff", "chain", "seconds")
    return {k: res[k] for k in keep if k in res}


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("science", __doc__, add_arguments, run)
