"""Ray job: the science run (`unibct-ray bench science`): methods over seeds on noisy data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/science.py --out /shared/science [--scenario extended-class] [--seeds 0 1 2 3 4]

Renders the noisy training set and the science IJB-C once, trains the old model once and every
method's new model per seed in one Ray Train fit, evaluates all of them at FAR 1e-4 and 1e-3
and writes OUT/science.json and OUT/science.md. Rerunning the same command after an
interruption reuses the finished runs and resumes the interrupted ones. --smoke-test runs the
quick form (40 identities, 3 epochs, 2 seeds) into OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unibct_ray.jobs import job_parser, run_cli_steps, run_job

PROG = "jobs/science.py"


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        PROG, __doc__,
        config="does not apply: the run uses jobs/configs/synthetic (refused if given)",
        num_workers="does not apply: the synthetic configs' num_workers (refused if given)",
        use_gpu="does not apply: the synthetic configs run on CPU (refused if given)",
        smoke_test="the quick form (about two minutes on 2 cores)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (reused between runs)")
    p.add_argument("--scenario", default="extended-class", help="upgrade scenario (default extended-class)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="new-model seeds (default 0-4)")
    p.add_argument("--methods", nargs="+", default=None, help="methods (default independent l2 bct unibct)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (no --address)")
    return p


def cli_argv(a: argparse.Namespace) -> list[str]:
    """The ``unibct-ray`` command line of this job."""
    argv = ["bench", "science", "--out", str(a.out), "--scenario", a.scenario]
    if a.smoke_test:
        argv.append("--quick")
    if a.seeds:
        argv += ["--seeds", *map(str, a.seeds)]
    if a.methods:
        argv += ["--methods", *a.methods]
    if a.address:
        argv += ["--address", a.address]
    if a.num_cpus is not None:
        argv += ["--num-cpus", str(a.num_cpus)]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    for flag, value in (("--config", a.config), ("--num-workers", a.num_workers), ("--use-gpu", a.use_gpu)):
        if value is not None:
            parser.error(f"{flag} does not apply to the science run (it trains the synthetic configs)")
    return run_job(PROG, a.debug, lambda: run_cli_steps([cli_argv(a)], a.debug))


if __name__ == "__main__":
    sys.exit(main())
