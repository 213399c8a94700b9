"""Ray job: train an old model or a compatible new model (`unibct-ray train`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --config jobs/configs/ms1mv3/open-class/new-unibct.yaml [--num-workers 8] [--use-gpu]

--smoke-test trains the same config for a few steps: the first 4 global batches of its data
(copied to STORAGE/NAME-smoke/data), 1 epoch (unibct: 2, with a refinement after epoch 1),
run name NAME-smoke. It checks the wiring (Ray, the workers' imports, GPUs/NCCL, the data and
the old checkpoint visible on every node, checkpoints written to shared storage) in minutes,
and replaces the previous smoke run; the real run's directory is never touched.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from unibct_ray.jobs import SMOKE_SUFFIX, job_parser, overrides, run_cli_steps, run_job

PROG = "jobs/train.py"
SMOKE_BATCHES = 4  # global batches in the smoke test's data subset (= steps per epoch)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        PROG, __doc__,
        config="training config (YAML, strict; see jobs/configs/); required",
        num_workers="Ray Train workers (= --set num_workers=N; global_batch must divide evenly)",
        use_gpu="one GPU per worker, nccl + fp16 autocast (= --set use_gpu=true); --no-use-gpu forces CPU",
        smoke_test="a few steps on the first batches of the config's data, run name NAME-smoke",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=2 (repeatable)")
    p.add_argument("--resume", type=Path, default=None, help="run directory to continue (not with --smoke-test)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (no --address)")
    p.add_argument("--plan", action="store_true",
                   help="print the resource plan on the cluster and exit (0: it can start, 2: it cannot); trains nothing")
    return p


def cli_argv(a: argparse.Namespace, smoke_sets: Sequence[str] = ()) -> list[str]:
    """The ``unibct-ray`` command line of this job (``smoke_sets`` from :func:`prepare_smoke`)."""
    argv = ["train", "--config", str(a.config)]
    for s in [*overrides(a), *smoke_sets]:
        argv += ["--set", s]
    if a.resume is not None:
        argv += ["--resume", str(a.resume)]
    if a.address:
        argv += ["--address", a.address]
    if a.num_cpus is not None:
        argv += ["--num-cpus", str(a.num_cpus)]
    if a.plan:
        argv += ["--plan"]
    return argv


def prepare_smoke(a: argparse.Namespace) -> list[str]:
    """Write the smoke test's data subset and return the overrides that point the run at it."""
    from unibct_ray.config import load_config
    from unibct_ray.data.subset import take_rows
    from unibct_ray.errors import UserError

    cfg = load_config(a.config, overrides(a))
    name = cfg.name + SMOKE_SUFFIX
    run_dir = Path(cfg.storage) / name
    if cfg.compat.method != "independent" and not Path(cfg.compat.old_checkpoint).is_file():
        raise UserError(f"{a.config}: compat.old_checkpoint {cfg.compat.old_checkpoint} does not exist yet: train "
                        "the old model first (a smoke test of it writes .../<old name>-smoke/final.pt, usable "
                        "with --set compat.old_checkpoint=...)")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the previous smoke run: a smoke test always starts afresh
    m = take_rows(cfg.data.train, run_dir / "data", SMOKE_BATCHES * cfg.global_batch)
    print(f"[{PROG}] smoke test: {m.rows} rows of {m.classes} classes from {cfg.data.train} -> {run_dir}", flush=True)
    sets = [f"name={name}", f"data.train={run_dir / 'data'}"]
    if cfg.compat.method == "unibct":
        sets += ["optim.epochs=2", "compat.refine_epochs=[1]"]
    else:
        sets += ["optim.epochs=1"]
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.config is None:
        parser.error("--config is required (a training config, e.g. jobs/configs/synthetic/old.yaml)")
    if a.smoke_test and a.plan:
        parser.error("--plan checks the real run; drop --smoke-test")
    if a.smoke_test and a.resume is not None:
        parser.error("--smoke-test always starts a fresh NAME-smoke run; drop --resume")
    return run_job(PROG, a.debug, lambda: run_cli_steps([cli_argv(a, prepare_smoke(a) if a.smoke_test else [])],
                                                        a.debug))


if __name__ == "__main__":
    sys.exit(main())
