"""``unibct-ray``: the command line. Each subcommand's ``--help`` explains its inputs/outputs.

Errors a user can cause (a bad file, flag or config) print one line naming the file and the
problem and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from unibct_ray import small
from unibct_ray.errors import JobFailedError, UserError

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2
EXIT_JOB_FAILED = 1


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _sub(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
         run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=description, formatter_class=_Formatter)
    p.set_defaults(run=run)
    return p


def _note(msg: str) -> None:
    """A line about something the command adjusted for the user (it goes on; not an error)."""
    print(f"unibct-ray: note: {msg}", file=sys.stderr, flush=True)


def _ray_console(a: argparse.Namespace, out: Path):
    """Ray's own log lines of the command go to OUT/logs/ray.log (one line names it); with
    ``--verbose`` they stay on the console."""
    from unibct_ray.distributed.console import RUN_LOG, ray_console

    return ray_console(out / RUN_LOG, a.verbose)


def _ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a local Ray (default: max(4, 2 x cores))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- data synth
def _cmd_synth(a: argparse.Namespace) -> int:
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.synth import synthesize

    spec = SynthSpec(
        identities=a.identities,
        images_per_identity=a.images_per_identity,
        size=a.size,
        seed=a.seed,
        count_spread=a.count_spread,
        eval_identities=a.eval_identities,
        gallery_images=a.gallery_images,
        probes_per_identity=a.probes_per_identity,
        video_frames=a.video_frames,
        impostor_pairs=a.impostor_pairs,
        strength=a.strength,
        label_noise=a.label_noise,
        outliers=a.outliers,
        long_tail=a.long_tail,
    )
    spec.validate()
    ensure_ray(a.address, num_cpus=a.num_cpus, quiet=not a.verbose)
    summary = synthesize(spec, a.out, overwrite=a.overwrite, progress=not a.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------- data convert
def _cmd_convert(a: argparse.Namespace) -> int:
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray

    m = convert_rec(a.rec, a.out, idx=a.idx, rows_per_shard=a.rows_per_shard, verify=a.verify,
                    overwrite=a.overwrite, progress=not a.no_progress, parallelism=a.parallelism,
                    connect=lambda: ensure_ray(a.address, num_cpus=a.num_cpus, quiet=not a.verbose),
                    shuffle_seed=None if a.record_order else a.seed)
    print(f"wrote {m.rows} images of {m.classes} classes in {len(m.shards)} shards to {m.path}")
    return 0


# ---------------------------------------------------------------- data split
def _cmd_split(a: argparse.Namespace) -> int:
    from unibct_ray.data.splits import split_shards

    s = split_shards(a.src, a.scenario, a.ratio, a.out, overwrite=a.overwrite, progress=not a.no_progress)
    print(f"{a.scenario} r={a.ratio}: old {s['old']['rows']} images / {s['old']['classes']} classes, "
          f"new {s['new']['rows']} images / {s['new']['classes']} classes -> {a.out}")
    return 0


# ---------------------------------------------------------------- train
def _cmd_train(a: argparse.Namespace) -> int:
    from unibct_ray.config import load_config
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.train import check_inputs, train

    cfg = load_config(a.config, a.set or [], note=_note)
    if a.num_workers is not None or a.use_gpu:
        from dataclasses import replace

        cfg = replace(cfg, num_workers=a.num_workers or cfg.num_workers, use_gpu=a.use_gpu or cfg.use_gpu).validate(str(a.config))
    if a.plan:
        return _show_plan(a, cfg)
    check_inputs(cfg, a.resume)  # a bad config, shard set or checkpoint fails before Ray starts
    with _ray_console(a, Path(a.resume) if a.resume else Path(cfg.storage) / cfg.name):
        ensure_ray(a.address, num_cpus=a.num_cpus, quiet=not a.verbose)
        res = train(cfg, resume=a.resume)  # refuses, before any fit(), a run the cluster cannot hold
    print(f"done: {res.checkpoint} (epoch {res.metrics.get('epoch')}, loss {res.metrics.get('loss', float('nan')):.4f})")
    return 0


def _show_plan(a: argparse.Namespace, cfg, trials: int = 1) -> int:
    """``--plan``: print the resource plan of ``cfg`` on the cluster (or on ``--plan-nodes``);
    exit 0 when the run can start, 2 with the shortfall line when it cannot. Trains nothing."""
    from unibct_ray.plan import check_plan, parse_nodes, plan_run

    num_classes = old_backbone = None
    try:  # sizes the head in the memory estimate; the data may live only on the cluster
        from unibct_ray.data.shards import read_manifest

        num_classes = read_manifest(cfg.data.train, check_files=False).classes
    except (UserError, OSError, ValueError):
        pass
    if cfg.compat.old_checkpoint and Path(cfg.compat.old_checkpoint).is_file():
        try:
            from unibct_ray.checkpoint import load_checkpoint

            old_backbone = json.loads(load_checkpoint(cfg.compat.old_checkpoint)["config"])["model"]["backbone"]
        except (UserError, OSError, ValueError, KeyError):
            pass
    if a.plan_nodes:
        nodes = parse_nodes(a.plan_nodes)
    else:
        from unibct_ray.distributed.plan import cluster_nodes
        from unibct_ray.distributed.runtime import ensure_ray

        ensure_ray(a.address, num_cpus=a.num_cpus)
        nodes = cluster_nodes()
    plan = plan_run(cfg, nodes, trials=trials, num_classes=num_classes, old_backbone=old_backbone)
    print(plan.table())
    check_plan(plan)
    return 0


def _plan_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plan", action="store_true",
                   help=f"print the resource plan ({what}: each phase, what goes on which node, CPUs/GPUs, "
                        "memory estimates) and exit: 0 when it can start, 2 when it cannot")
    p.add_argument("--plan-nodes", default=None, metavar="SPEC",
                   help="with --plan: plan for these nodes instead of the connected cluster, "
                        "comma-separated CPU[:GPU][xCOUNT], the head first; e.g. 0,32:4x2")


# ---------------------------------------------------------------- prototypes
def _cmd_prototypes(a: argparse.Namespace) -> int:
    from unibct_ray.prototypes_tool import run_prototypes

    run_prototypes(a)
    return 0


# ---------------------------------------------------------------- eval
def _small_pages() -> None:
    """Ask numpy for ordinary 4 KiB pages in this process (unless ``NUMPY_MADVISE_HUGEPAGE`` says).

    numpy marks each large array for transparent huge pages. Where the kernel compacts memory
    to find them on first touch (``defrag`` = ``madvise``, a common default), a fresh process
    paid up to 0.7 s for one 250 MB array on a busy 2-core machine; the whole-IJB-C evaluation
    from feature files ran ~0.7 s faster with 4 KiB pages (3 alternating runs each: 8.0-8.4 s
    against 8.7-9.2 s wall). Only the evaluation's own process is affected.
    """
    import os

    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def _cmd_eval(a: argparse.Namespace) -> int:
    from unibct_ray.metrics.report import start_plot_process, stop_plot_process

    # matplotlib loads in a child process while this one evaluates (~0.6 s off the wall time)
    start_plot_process()
    try:
        return _run_eval_command(a)
    finally:
        stop_plot_process()


def _run_eval_command(a: argparse.Namespace) -> int:
    import contextlib

    from unibct_ray.distributed.evaluate import EvalArgs, run_eval

    from unibct_ray.heap import keep_freed_memory

    _small_pages()
    keep_freed_memory()  # freed score grids stay in the heap (unibct_ray.heap)

    ray_log = contextlib.ExitStack()

    def connect() -> None:
        # Imported only when Ray is needed: feature files with one gallery shard never load ray.
        # Called once the inputs are checked: a bad input leaves no OUT behind, not even a log.
        from unibct_ray.distributed.runtime import ensure_ray

        ray_log.enter_context(_ray_console(a, a.out))
        ensure_ray(a.address, num_cpus=a.num_cpus, quiet=not a.verbose)

    args = EvalArgs(ijbc=a.ijbc, out=a.out, old_checkpoint=a.old_checkpoint, old_features=a.old_features,
                    new_checkpoint=a.new_checkpoint, new_features=a.new_features, criterion_far=a.criterion_far,
                    distractors=a.distractors, distractor_features=a.distractor_features,
                    new_distractor_features=a.new_distractor_features, index=a.index,
                    shards=a.shards, bootstrap=a.bootstrap, seed=a.seed, actors=a.actors, overwrite=a.overwrite,
                    cache_dir=a.cache_dir, use_gpu=a.use_gpu, gpus_per_actor=a.gpus_per_actor, batch_size=a.batch_size)
    log = lambda msg: print(f"[eval] {msg}", flush=True)  # noqa: E731
    if a.models is not None:
        with ray_log:
            return _eval_matrix(a, args, connect, log)
    with ray_log:
        r = run_eval(args, connect=connect, log=log)
    crit = r.get("protocol", {}).get("criterion_far", a.criterion_far)
    print(f"report: {a.out / 'report.md'}  compatible at FAR={crit:g}: {r.get('compatible')}")
    if a.gate:
        code, line = gate_verdict(r)
        print(line, flush=True)
        return code
    return 0


EXIT_GATE_FAILED = 3


def _eval_matrix(a: argparse.Namespace, args: Any, connect: Any, log: Any) -> int:
    from unibct_ray.distributed.evaluate import parse_models, run_matrix

    m = run_matrix(args, parse_models(a.models), a.pairs, connect=connect, log=log)
    print(f"matrix: {a.out / 'matrix.md'} (heat-map {a.out / 'matrix.png'})")
    for c in m["cells"]:
        print(f"  {c['query']} -> {c['gallery']} gallery: {'compatible' if c['compatible'] else 'NOT compatible'}")
    if not a.gate:
        return 0
    bad = [f"{c['query']} -> {c['gallery']}" for c in m["cells"] if c["compatible"] is not True]
    far = f"{m['criterion_far']:g}"
    if not m["cells"]:
        print("gate: FAIL - no pair to decide (give at least two models)", flush=True)
        return EXIT_GATE_FAILED
    if bad:
        print(f"gate: FAIL - not compatible at FAR={far}: {', '.join(bad)}; deploy only with a backfill of "
              "those galleries", flush=True)
        return EXIT_GATE_FAILED
    print(f"gate: PASS - all {len(m['cells'])} pairs compatible at FAR={far}", flush=True)
    return 0


def gate_verdict(report: dict) -> tuple[int, str]:
    """``eval --gate``: (exit status, the one line a release pipeline shows) from a report:
    0 when ``compatible`` is true, 3 when it is false or undecided (no cross test, NaN TARs)."""
    diff = report.get("difference") or {}
    far = diff.get("far")
    where = f" at FAR={far:g}" if isinstance(far, (int, float)) else ""
    value, ci = diff.get("value"), diff.get("ci95")
    detail = ""
    if isinstance(value, (int, float)):
        detail = f": TAR(cross) - TAR(self_old) = {value:+.4f}"
        if ci:
            detail += f", 95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    comp = report.get("compatible")
    if comp is True:
        return 0, f"gate: PASS - the new model is compatible with the old gallery{where}{detail}"
    if comp is False:
        return EXIT_GATE_FAILED, (f"gate: FAIL - not compatible{where}{detail}; "
                                  "deploy only with a backfill of the gallery")
    return EXIT_GATE_FAILED, f"gate: FAIL - compatibility undecided ({report.get('compatible_rule', 'no rule')})"


# ---------------------------------------------------------------- tune
def _cmd_tune(a: argparse.Namespace) -> int:
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.tune import run_tune
    from unibct_ray.tuning import check_validation, load_tune_spec, open_experiment

    if a.resume is None and (a.config is None or (a.num_samples is None and not a.plan)):
        raise UserError("--config and --num-samples are required (or --resume DIR to continue an experiment)")
    if a.resume is not None and (a.objective is not None or a.max_concurrent is not None or a.set):
        raise UserError("--objective/--max-concurrent/--set cannot change a resumed experiment (it keeps its recipe)")
    spec = None
    if a.config is not None:
        spec = load_tune_spec(a.config, objective=a.objective, max_concurrent=a.max_concurrent, sets=a.set or [],
                              note=_note)
    if a.plan:
        if a.resume is not None:
            spec, _, _ = open_experiment(spec, a.num_samples, a.resume)
        return _show_plan(a, spec.train_config({}, name=spec.name), trials=spec.max_concurrent)
    spec, n, out = open_experiment(spec, a.num_samples, a.resume)
    check_validation(spec)  # before Ray starts: a bad folder fails in a second
    with _ray_console(a, out):
        ensure_ray(a.address, num_cpus=a.num_cpus, quiet=not a.verbose)
        s = run_tune(spec, n, out, resume=a.resume is not None)
    counts = ", ".join(f"{c} {k.lower()}" for k, c in sorted(s["counts"].items()))
    if s["objective"] == "pareto":
        pick = f"Pareto front: {', '.join(s['pareto']) or 'empty'} -> {out / 'pareto'}/"
    elif s["best"]:
        pick = f"best: {s['best']} -> {out / 'best.yaml'}"
    else:
        pick = f"no complete trial reached self_new >= {s['self_new_floor']:g} (no best.yaml)"
    print(f"done: {len(s['trials'])} trials ({counts}); {pick}; report {out / 'tune.md'}")
    return 0


# ---------------------------------------------------------------- demo
def _cmd_demo(a: argparse.Namespace) -> int:
    from unibct_ray.demo import run_chain, run_demo

    if a.chain:
        run_chain(Path(a.out), scenario=a.scenario, seed=a.seed, quick=a.quick, methods=a.methods,
                  overwrite=a.overwrite, address=a.address, num_cpus=a.num_cpus, verbose=a.verbose)
        return 0
    run_demo(Path(a.out), scenario=a.scenario, seed=a.seed, quick=a.quick, methods=a.methods,
             overwrite=a.overwrite, address=a.address, num_cpus=a.num_cpus, verbose=a.verbose)
    return 0


def build_parser(bench: bool = True) -> argparse.ArgumentParser:
    """The command line. ``bench=False`` leaves out the bench subcommands (their modules are
    imported to build them), for a command line whose command is not ``bench``."""
    parser = argparse.ArgumentParser(
        prog="unibct-ray",
        description="Backward-compatible embedding training (UniBCT) and IJB-C evaluation on Ray.",
        epilog=f"Environment: {small.ENV}=1 runs data synth, train, tune and eval at a small size\n"
               "(2 epochs, 40 identities, 1 trial; the same inputs and outputs), as the\n"
               "README's walk-through test does.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's own log lines (its warnings, workers' output) on the console; by "
                             "default train, tune, eval and demo write them to OUT/logs/ray.log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="prepare data: synth | convert | split",
                          description="Prepare training and evaluation data.")
    dsub = data.add_subparsers(dest="data_command", metavar="STEP", required=True)

    p = _sub(dsub, "synth", "render a synthetic MS1M .rec/.idx and an IJB-C folder",
             "Render synthetic identities in the real formats, so every later step runs the same\n"
             "code as on MS1Mv3/IJB-C.\n\n"
             "Writes (atomically: nothing appears under --out until all is written):\n"
             "  OUT/train.rec, OUT/train.idx   MS1M layout: record 0 header, JPEG image records\n"
             "                                 (keys 1..n, class order), identity records\n"
             "  OUT/IJBC/loose_crop/*.jpg      unaligned evaluation faces (disjoint identities)\n"
             "  OUT/IJBC/meta/*                ijbc_face_tid_mid.txt, ijbc_name_5pts_score.txt,\n"
             "                                 ijbc_template_pair_label.txt, ijbc_1N_*.csv\n"
             "  OUT/train_truth.parquet        per training image: index, label, true_identity,\n"
             "                                 noisy, outlier (what --label-noise/--outliers did)\n"
             "  OUT/synth.json                 the settings, so the set can be re-rendered\n"
             "Deterministic for a given --seed, whatever the number of Ray workers.\n\n"
             "An evaluation set that resolves TAR@FAR=1e-4 (2,000 subjects, 10k genuine and 1M\n"
             "impostor template pairs, ~44k images):\n"
             "  --subjects 2000 --gallery-images 2 --probes-per-subject 5 --video-frames 3\n"
             "  --impostor-pairs 1000000",
             _cmd_synth)
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    p.add_argument("--identities", type=int, default=200, help="training identities (classes)")
    p.add_argument("--images-per-identity", type=int, default=20, help="mean training images per identity")
    p.add_argument("--count-spread", type=float, default=0.5,
                   help="images per identity vary uniformly in K*(1 +- spread) (0: exactly K)")
    p.add_argument("--size", type=int, default=112, help="side of the aligned training crops in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--subjects", "--eval-identities", dest="eval_identities", type=int, default=200, metavar="N",
                   help="IJB-C subjects (disjoint from training)")
    p.add_argument("--gallery-images", type=int, default=3, help="stills in each subject's gallery template")
    p.add_argument("--probes-per-subject", "--probes-per-identity", dest="probes_per_identity", type=int,
                   default=3, metavar="N", help="IJB-C probe templates per subject")
    p.add_argument("--video-frames", type=int, default=6,
                   help="frames of an IJB-C video media: min(3, N)..N (1: stills only)")
    p.add_argument("--impostor-pairs", type=int, default=20_000, help="IJB-C 1:1 impostor pairs (at most)")
    p.add_argument("--label-noise", type=float, default=0.0, metavar="F",
                   help="fraction of each class's images rendered from another identity, keeping the label")
    p.add_argument("--outliers", type=float, default=0.0, metavar="F",
                   help="fraction of each class's images forced hard (extreme pose, strong blur, heavy occlusion)")
    p.add_argument("--long-tail", type=float, default=0.0, metavar="ALPHA",
                   help="power-law class sizes n_r ~ r^-ALPHA with the same mean (0: off; replaces --count-spread)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="nuisance strength (0 = clean canonical faces; 1 = benchmark default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _ray_flags(p)

    p = _sub(dsub, "convert", "MS1M train.rec/.idx -> Parquet shards",
             "Convert an insightface MS1M RecordIO file (train.rec + train.idx; no mxnet needed)\n"
             "into Parquet shards, as parallel Ray tasks over key ranges.\n\n"
             "Writes OUT/part-NNNNN.parquet (columns: image = JPEG bytes as stored, label = int64\n"
             "class, index = int64 record key; rows in a seeded permutation of the keys, so every\n"
             "shard mixes many classes; --record-order keeps the .rec order) and\n"
             "OUT/manifest.json (rows, classes, shards, source file and size). OUT appears only\n"
             "when complete. On a cluster, the .rec and OUT must be on storage all nodes see.",
             _cmd_convert)
    p.add_argument("--rec", required=True, type=Path, help="path to train.rec")
    p.add_argument("--idx", type=Path, default=None, help="path to train.idx (default: beside --rec)")
    p.add_argument("--out", required=True, type=Path, help="output shard directory (must not exist)")
    p.add_argument("--rows-per-shard", type=int, default=50_000, help="images per Parquet shard")
    p.add_argument("--verify", choices=["signature", "header", "decode"], default="signature",
                   help="image check: JPEG/PNG signature (free), parse the header (~70 us/img), or "
                        "fully decode (~370 us/img)")
    p.add_argument("--parallelism", type=int, default=None,
                   help="conversion tasks in flight (default: the Ray cluster's CPU count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row permutation")
    p.add_argument("--record-order", action="store_true",
                   help="write rows in the .rec's (class) order instead of a seeded permutation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _ray_flags(p)

    p = _sub(dsub, "split", "old/new training sets for an upgrade scenario",
             "Split a shard set into the old model's and the new model's training sets:\n"
             "  extended-data   old: first r of each class's images   new: everything\n"
             "  extended-class  old: first r of the classes           new: everything\n"
             "  open-data       old: first r of each class's images   new: the other images\n"
             "  open-class      old: first r of the classes           new: the other classes\n"
             "'first' is record order; counts use Python rounding (half to even) and a class\n"
             "with one image is in both data halves, reproducing the public MS1Mv3 splits.\n\n"
             "Writes OUT/old/ and OUT/new/ (shard sets: label contiguous 0..C-1 within each set,\n"
             "source_label = class in --src) and OUT/manifest.json with the counts.",
             _cmd_split)
    p.add_argument("--src", required=True, type=Path, help="shard set written by `data convert`")
    p.add_argument("--scenario", required=True,
                   choices=["extended-data", "extended-class", "open-data", "open-class"])
    p.add_argument("--ratio", type=float, default=0.3, help="split ratio r")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _sub(sub, "train", "train an old model or a compatible new model on Ray",
             "Train on a shard set with Ray Train (DDP over --num-workers workers; gloo on CPU,\n"
             "nccl + fp16 autocast on GPU). The config (YAML, strict: unknown keys are errors)\n"
             "chooses the model and the method: compat.method = independent | l2 | bct | unibct |\n"
             "nccl | advbct | mixbct; all but independent need compat.old_checkpoint.\n"
             "Examples: jobs/configs/*.yaml.\n\n"
             "Writes STORAGE/NAME/: config.json, metrics.csv (per epoch: loss terms, lr, images/s),\n"
             "a checkpoint per epoch (Ray Train's checkpoint dirs), final.pt; for compatible\n"
             "methods STORAGE/old_features/<key>/ (old-model features of the training set, keyed by\n"
             "index, one copy per old checkpoint and shard set, shared by runs) and,\n"
             "for unibct, new_features-epochNNN/ and prototypes-epochNNN.npy at each refinement;\n"
             "for advbct/mixbct, advbct-classes.npz / mixbct-credible.npz (from the old features).\n"
             "A failed worker restarts from the last checkpoint; --resume RUN_DIR continues a run.\n"
             "Before anything starts the run is planned on the cluster's nodes: one that could never\n"
             "be scheduled (e.g. no CPU left for Ray Data's decoding) exits 2; --plan prints the plan.",
             _cmd_train)
    p.add_argument("--config", required=True, type=Path, help="YAML config (see jobs/configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=2 (repeatable)")
    p.add_argument("--resume", type=Path, default=None, help="run directory to continue")
    p.add_argument("--num-workers", type=int, default=None, help="override num_workers")
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs (one per worker)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    _plan_flags(p, "workers, decode tasks, extraction and refinement actors")

    p = _sub(sub, "prototypes", "offline class prototypes (structural refinement)",
             "Compute UniBCT class prototypes from features, the same code the training uses.\n\n"
             "Inputs: --old-features O.npy and --new-features N.npy (float [n, d], same rows),\n"
             "--labels L.npy (int [n], classes 0..C-1). Output: --out P.npy, float32 [C, d], row c\n"
             "the unit-norm prototype of class c. --no-refine gives normalised class means;\n"
             "--axis column reproduces the public re-implementation (equal to the plain mean).\n"
             "--workers K > 1 spreads class ranges over K Ray actors.",
             _cmd_prototypes)
    p.add_argument("--old-features", required=True, type=Path)
    p.add_argument("--new-features", type=Path, default=None, help="(not needed with --no-refine)")
    p.add_argument("--labels", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lam", type=float, default=0.9, help="lambda of the propagation")
    p.add_argument("--temperature", type=float, default=0.05, help="tau of the similarity softmax")
    p.add_argument("--axis", choices=["row", "column"], default="row", help="softmax normalisation axis")
    p.add_argument("--no-refine", action="store_true", help="plain normalised class means")
    p.add_argument("--workers", type=int, default=1, help="Ray actors (1 = in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = _sub(sub, "eval", "IJB-C 1:1 and 1:N, self- and cross-model",
             "Evaluate an old and/or a new model on an IJB-C folder (the insightface layout:\n"
             "ROOT/IJBC/meta/*, ROOT/IJBC/loose_crop/*.jpg; ROOT may also be the IJBC folder).\n"
             "Each model comes as a checkpoint (images aligned with their 5 points, emb + flip,\n"
             "on a Ray actor pool; cached in OUT/cache) or as per-image features (.npy, float32\n"
             "or float16, rows in ijbc_name_5pts_score.txt order, already emb + flip).\n\n"
             "Tests: self_old, self_new and cross (1:1: enrolment column OLD, verification NEW;\n"
             "1:N: galleries OLD, probes NEW). compatible = cross > self_old at --criterion-far\n"
             "(and, with --bootstrap N, the 95% interval of the difference above 0).\n"
             "With --distractors N each gallery gets N distractor faces embedded by its own\n"
             "model (old galleries: old model, self_new: new model).\n"
             "Writes OUT/report.json, OUT/report.md, OUT/roc.png, OUT/cmc.png.\n\n"
             "Deployment gate (--gate): exit status 0 when the upgrade is compatible, 3 when it\n"
             "is not (or the verdict is undecided), 2 on a usage/data error, 1 on a failed job;\n"
             "the last line printed is the verdict. A release pipeline step:\n"
             "  unibct-ray eval --ijbc /data/ijb --old-checkpoint old.pt --new-checkpoint new.pt \\\n"
             "      --out reports/candidate --gate\n\n"
             "Several models (--models NAME=PATH ..., oldest first; checkpoints or .npy features):\n"
             "the compatibility matrix. Every checkpoint is embedded in one extraction pass, then\n"
             "each (query, gallery) pair with the query newer (--pairs all), only the newest model\n"
             "against each older gallery (--pairs latest), or each model against its predecessor\n"
             "(--pairs adjacent) is scored, with every model's self test on the diagonal. A pair is\n"
             "compatible when cross(query, gallery) > self(gallery). Writes OUT/matrix.md (tables),\n"
             "OUT/matrix.png (heat-map), OUT/matrix.json and OUT/pairs/<query>-vs-<gallery>/report.*;\n"
             "--gate then exits 3 unless every requested pair is compatible.\n"
             "  unibct-ray eval --ijbc /data/ijb --models v1=v1.pt v2=v2.pt v3=v3.pt --out reports/chain",
             _cmd_eval)
    p.add_argument("--ijbc", required=True, type=Path, help="IJB-C root")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--old-checkpoint", type=Path, default=None)
    g.add_argument("--old-features", type=Path, default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--new-checkpoint", type=Path, default=None)
    g.add_argument("--new-features", type=Path, default=None)
    p.add_argument("--models", nargs="+", default=None, metavar="NAME=PATH",
                   help="several models, oldest first (checkpoint or .npy features each): evaluate their "
                        "compatibility matrix instead of one old/new pair")
    p.add_argument("--pairs", choices=["all", "latest", "adjacent"], default="all",
                   help="with --models: every query newer than its gallery (all), the newest model against "
                        "each older one (latest), or each model against its predecessor (adjacent)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--criterion-far", type=float, default=1e-4, help="FAR of the compatibility criterion")
    p.add_argument("--gate", action="store_true",
                   help="exit 3 unless the new model is compatible (a release pipeline's check; the report "
                        "is written either way)")
    p.add_argument("--bootstrap", type=int, default=200, help="subject resamples for 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / distractor seed")
    p.add_argument("--distractors", type=int, default=0, help="distractors added to each 1:N gallery")
    p.add_argument("--distractor-features", type=Path, default=None,
                   help="OLD-model embeddings of distractor faces (.npy), for the self_old and cross "
                        "galleries; default with --old-checkpoint: render synthetic faces")
    p.add_argument("--new-distractor-features", type=Path, default=None,
                   help="NEW-model embeddings of the distractor faces (.npy), for the self_new galleries; "
                        "default with --new-checkpoint: render synthetic faces")
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat", help="FAISS index for 1:N")
    p.add_argument("--shards", type=int, default=None,
                   help="gallery shards on Ray actors (1: in process, no Ray); default: 1 unless a "
                        "search's gallery rows x probes x dim exceeds 5e10 (about 5k gallery rows "
                        "for IJB-C's 19,593 probes at 512-d), then 2")
    p.add_argument("--actors", type=int, default=2, help="feature-extraction actors")
    p.add_argument("--use-gpu", action="store_true",
                   help="embed (IJB-C images, distractors) on GPU actors under fp16 autocast and search the "
                        "FAISS shards on GPUs (flat, ivf; hnsw stays on CPU)")
    p.add_argument("--gpus-per-actor", type=float, default=0.5,
                   help="GPU share of each extraction actor and FAISS shard with --use-gpu (default 0.5: "
                        "two per GPU)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass of an extraction actor (default 64 for CPU actors; "
                        "256-512 suits a GPU share)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache of checkpoint features and of the parsed IJB-C meta (default OUT/cache); "
                        "share one between runs on the same IJB-C folder")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")

    p = _sub(sub, "tune", "Ray Tune + Optuna sweep over compatibility settings",
             "Search train-config keys (e.g. compat.weight, compat.scale, compat.margin, compat.lam,\n"
             "compat.temperature, compat.refine_epochs) with Optuna on Ray Tune. Each trial trains the\n"
             "sampled config on Ray Train, then evaluates it against the old model on a validation\n"
             "IJB-C folder of held-out identities (TAR at the tune file's FAR; no bootstrap).\n"
             "  --objective cross   maximise cross TAR subject to self_new >= the file's self_new_floor\n"
             "  --objective pareto  cross and self_new both maximised; the Pareto front is returned\n"
             "The tune file (YAML, strict) names the base train config, the old checkpoint, the\n"
             "validation folder, the FAR, the floor, optional ASHA settings and the search space;\n"
             "see jobs/configs/synthetic/tune-unibct.yaml.\n\n"
             "Writes DIR = STORAGE/NAME of the tune file: tune.md (trials table, best or Pareto set),\n"
             "trials.json, best.yaml (cross) or pareto/<trial>.yaml (pareto): whole train configs for\n"
             "`unibct-ray train --config`, pareto.png (cross vs self_new), trials/<trial>/ (all of a\n"
             "trial: its training run, validation reports and Ray Tune's log of it).\n"
             "--resume DIR continues an interrupted experiment: finished trials are kept, the others\n"
             "run again from their last training checkpoint.",
             _cmd_tune)
    p.add_argument("--config", type=Path, default=None, help="tune file (YAML); required unless --resume")
    p.add_argument("--num-samples", type=int, default=None, help="trials to run; required unless --resume")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default: the tune file's max_concurrent, else 1)")
    p.add_argument("--objective", choices=["cross", "pareto"], default=None,
                   help="what to optimise (default: the tune file's objective, else cross)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of the base train config for every trial, e.g. --set num_workers=4")
    p.add_argument("--resume", type=Path, default=None, help="experiment directory to continue")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    _plan_flags(p, "max_concurrent trials at once, each with its workers and decode task")

    p = _sub(sub, "demo", "the embedded default end to end on local Ray",
             "Run the main job on the embedded default: synthetic data in the real formats, local Ray,\n"
             "CPU. Per scenario: train the old model and one new model per method, evaluate each\n"
             "(self_old, self_new, cross on the synthetic IJB-C) and write DIR/summary.json\n"
             "({scenario: {method: report}}), DIR/summary.md and DIR/summary.png. Data are cached and\n"
             "finished runs reused between invocations; configs: jobs/configs/synthetic/*.yaml.\n\n"
             "--chain: two upgrades in a row per method, v1 (the old model) -> v2 (the new split,\n"
             "compatible with v1) -> v3 (every training identity, compatible with v2 only), then the\n"
             "compatibility matrix of each chain: every (query, gallery) pair with the query newer or\n"
             "equal, 1:1 and 1:N. Writes DIR/chain.md (tables), DIR/chain.png (heat-maps),\n"
             "DIR/chain.json. Default methods with --chain: independent bct unibct. It reuses the\n"
             "demo's finished old and new models from the same DIR.",
             _cmd_demo)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working directory")
    p.add_argument("--scenario", default="open-class",
                   choices=["open-class", "open-data", "extended-class", "extended-data", "all"],
                   help="upgrade scenario (all: the four, one after the other)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training")
    p.add_argument("--quick", action="store_true", help="tiny data and 3 epochs: checks the wiring in ~2 minutes")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="new-model methods (default: independent l2 bct unibct; also nccl, advbct, mixbct, "
                        "l2-weak, unibct-column = the column-softmax refinement ablation)")
    p.add_argument("--chain", action="store_true",
                   help="multi-step upgrades v1 -> v2 -> v3 per method and their compatibility matrix")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate (the rendered data stay cached)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")

    from unibct_ray.bench import add_bench_parser

    add_bench_parser(sub, _Formatter, subcommands=bench)
    return parser


#: Ranges of the numeric flags, by destination name, checked after parsing and before any work:
#: (lowest, highest, whether the bounds are open). A flag a subcommand lacks is skipped.
_FLAG_RANGES: dict[str, tuple[float, float, bool]] = {
    "criterion_far": (0.0, 1.0, True),
    "ratio": (0.0, 1.0, True),
    "lam": (0.0, 1.0, True),
    "gpus_per_actor": (0.0, 1.0, False),
    "temperature": (0.0, 1e3, True),
    "count_spread": (0.0, 1.0, False),
    "strength": (0.0, 100.0, False),
    "bootstrap": (0, 1_000_000, False),
    "distractors": (0, 1 << 40, False),
    "impostor_pairs": (0, 1 << 40, False),
    "seed": (0, 2**63 - 1, False),
    "actors": (1, 100_000, False),
    "shards": (1, 100_000, False),
    "workers": (1, 100_000, False),
    "num_workers": (1, 100_000, False),
    "num_cpus": (1, 1_000_000, False),
    "parallelism": (1, 1_000_000, False),
    "rows_per_shard": (1, 1 << 30, False),
    "batch_size": (1, 1 << 20, False),
    "num_samples": (1, 1_000_000, False),
    "max_concurrent": (1, 100_000, False),
}


def check_flag_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag in range, finite, before anything starts (``--criterion-far 7`` used to
    write a report, ``--bootstrap -5`` to raise deep inside, ``--actors -4`` to be ignored)."""
    import math

    for dest, (lo, hi, open_) in _FLAG_RANGES.items():
        v = getattr(args, dest, None)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        ok = math.isfinite(v) and ((lo < v < hi) if open_ else (lo <= v <= hi))
        if not ok:
            bounds = f"in ({lo:g}, {hi:g})" if open_ else (f">= {lo:g}" if hi >= 1 << 30 else f"in [{lo:g}, {hi:g}]")
            raise UserError(f"--{dest.replace('_', '-')}: must be {bounds}, got {v}")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # The global flags take no value, so the first word that is not a flag is the command.
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(bench=command in (None, "bench"))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "command", None) != "bench":  # benches check their own sizes
            check_flag_ranges(args)
        small.shrink(args)  # UNIBCT_RAY_SMALL=1: the walk-through at a small size
        return int(args.run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"unibct-ray: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # unwritable output, disk full, permission denied on an input
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"unibct-ray: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except JobFailedError as e:
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # remote tracebacks stay out
        print(f"unibct-ray: failed: {first} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        print("unibct-ray: interrupted (no partial output was kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
