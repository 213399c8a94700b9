"""Ray job: a Ray Tune + Optuna sweep of the compatibility settings (`unibct-ray tune`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --config jobs/configs/synthetic/tune-unibct.yaml --num-samples 8 [--max-concurrent 2]

--config is a tune file (see jobs/configs/synthetic/tune-unibct.yaml); --num-workers and
--use-gpu set num_workers / use_gpu of every trial's training (= unibct-ray tune --set ...).
--resume DIR continues an interrupted sweep (DIR = the tune file's STORAGE/NAME).

--smoke-test runs 2 trials of the same sweep, one at a time, each training on the first 4
global batches of the data (copied to STORAGE/NAME-smoke/data) for 1 epoch (unibct: 2, with a
refinement after epoch 1; the epoch keys leave the search space), as experiment NAME-smoke.
It checks the wiring (Tune, Optuna, the trials' Train workers, the validation set and the old
checkpoint visible from the cluster) and replaces the previous smoke sweep; the real
experiment's directory is never touched.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from unibct_ray.jobs import SMOKE_SUFFIX, job_parser, overrides, run_cli_steps, run_job

PROG = "jobs/tune.py"
SMOKE_BATCHES = 4   # global batches of data per smoke trial (= steps per epoch)
SMOKE_SAMPLES = 2
EPOCH_KEYS = ("optim.epochs", "compat.refine_epochs")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        PROG, __doc__,
        config="tune file (YAML, strict; see jobs/configs/synthetic/tune-unibct.yaml); required unless --resume",
        num_workers="Ray Train workers of every trial (= --set num_workers=N; global_batch must divide evenly)",
        use_gpu="one GPU per Train worker in every trial (= --set use_gpu=true); --no-use-gpu forces CPU",
        smoke_test=f"{SMOKE_SAMPLES} short trials on the first batches of the data, experiment NAME-smoke",
    )
    p.add_argument("--num-samples", type=int, default=None, help="trials (required unless --resume or --smoke-test)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at a time (default: the tune file's)")
    p.add_argument("--objective", choices=["cross", "pareto"], default=None, help="default: the tune file's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base train config for every trial (repeatable)")
    p.add_argument("--resume", type=Path, default=None, help="experiment directory to continue")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (no --address)")
    p.add_argument("--plan", action="store_true",
                   help="print the resource plan on the cluster and exit (0: it can start, 2: it cannot); trains nothing")
    return p


def load_job_config(path: str | Path):
    """The loader of this job's --config (a tune file, not a train config)."""
    from unibct_ray.tuning import load_tune_spec

    return load_tune_spec(path)


def cli_argv(a: argparse.Namespace, config: Path | None = None, num_samples: int | None = None) -> list[str]:
    """The ``unibct-ray tune`` command line of this job (``config``/``num_samples``: the smoke test's)."""
    argv = ["tune"]
    if a.resume is not None:
        argv += ["--resume", str(a.resume)]
    config = config or a.config
    if config is not None:
        argv += ["--config", str(config)]
    n = num_samples or a.num_samples
    if n is not None:
        argv += ["--num-samples", str(n)]
    if num_samples is not None:
        argv += ["--max-concurrent", "1"]
    elif a.max_concurrent is not None:
        argv += ["--max-concurrent", str(a.max_concurrent)]
    if a.objective is not None:
        argv += ["--objective", a.objective]
    if config is not None:
        for s in overrides(a):
            argv += ["--set", s]
    if a.address:
        argv += ["--address", a.address]
    if a.num_cpus is not None:
        argv += ["--num-cpus", str(a.num_cpus)]
    if a.plan:
        argv += ["--plan"]
    return argv


def smoke_tune_file(data: dict, *, source: Path, method: str, data_dir: Path) -> dict:
    """The smoke test's tune file from the real one's ``data``: experiment NAME-smoke, base by
    absolute path, the data subset, 1 epoch (unibct: 2, refinement after epoch 1) and a search
    space without the epoch keys."""
    out = dict(data)
    out["name"] = str(data.get("name", source.stem)) + SMOKE_SUFFIX
    out["base"] = str((source.parent / data["base"]).resolve())
    epochs = {"optim.epochs": 2, "compat.refine_epochs": [1]} if method == "unibct" else {"optim.epochs": 1}
    out["overrides"] = {**dict(data.get("overrides") or {}), "data.train": str(data_dir), **epochs}
    out["space"] = {k: v for k, v in dict(data["space"]).items() if k not in EPOCH_KEYS}
    out.pop("asha", None)  # one phase (or two) leaves nothing to stop early
    return out


def prepare_smoke(a: argparse.Namespace) -> Path:
    """Write the smoke test's data subset and tune file -> the tune file's path."""
    from unibct_ray.data.subset import take_rows
    from unibct_ray.errors import UserError
    from unibct_ray.tuning import load_tune_spec, read_tune_file

    spec = load_tune_spec(a.config, sets=overrides(a))
    cfg = spec.train_config({}, name="smoke")
    exp = spec.experiment_dir.with_name(spec.name + SMOKE_SUFFIX)
    if exp.exists():
        shutil.rmtree(exp)  # the previous smoke sweep: a smoke test always starts afresh
    m = take_rows(cfg.data.train, exp / "data", SMOKE_BATCHES * cfg.global_batch)
    print(f"[{PROG}] smoke test: {m.rows} rows of {m.classes} classes from {cfg.data.train} -> {exp}", flush=True)
    smoke = smoke_tune_file(read_tune_file(a.config), source=Path(a.config), method=cfg.compat.method, data_dir=exp / "data")
    if not smoke["space"]:
        raise UserError(f"{a.config}: space: only epoch keys are searched; the smoke test has nothing left to sample")
    path = exp / "tune-smoke.yaml"
    path.write_text(yaml.safe_dump(smoke, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.smoke_test:
        if a.plan:
            parser.error("--plan checks the real sweep; drop --smoke-test")
        if a.resume is not None:
            parser.error("--smoke-test always starts a fresh NAME-smoke sweep; drop --resume")
        if a.config is None:
            parser.error("--smoke-test needs --config (a tune file)")
        return run_job(PROG, a.debug, lambda: run_cli_steps([cli_argv(a, prepare_smoke(a), SMOKE_SAMPLES)], a.debug))
    if a.resume is None and (a.config is None or (a.num_samples is None and not a.plan)):
        parser.error("--config and --num-samples are required (or --resume DIR)")
    return run_job(PROG, a.debug, lambda: run_cli_steps([cli_argv(a)], a.debug))


if __name__ == "__main__":
    sys.exit(main())
