"""Ray job: MS1Mv3 train.rec -> Parquet shards -> the upgrade splits (`unibct-ray data convert/split`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/prepare_ms1m.py --config jobs/configs/ms1mv3/prepare.yaml [--num-workers 64]

Writes OUT-shards (conversion: parallel Ray tasks, one shard each) and OUT-<scenario>/{old,new}
for each scenario (the data.train paths of jobs/configs/ms1mv3/<scenario>/*.yaml). Steps whose
output is complete (a manifest.json) are skipped, so an interrupted job can simply be resubmitted.
--rec/--out/--ratio/--scenario override the config's values.

--smoke-test runs the same steps on a tiny synthetic .rec (20 identities) rendered into
OUT-smoke-synth, writing OUT-smoke-shards and OUT-smoke-<scenario>: it checks the wiring (Ray,
tasks on every node, OUT on shared storage) in a minute. With --rec, the real file's header is
read as a check that the cluster sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unibct_ray.jobs import SCENARIOS, SMOKE_SUFFIX, PrepareConfig, job_parser, load_prepare_config, run_cli_steps, run_job

PROG = "jobs/prepare_ms1m.py"
load_job_config = load_prepare_config  # what --config holds (tests/test_cluster_docs.py checks documented configs)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        PROG, __doc__,
        config="YAML with rec, out, ratio, scenarios, rows_per_shard, verify (jobs/configs/ms1mv3/prepare.yaml)",
        num_workers="conversion tasks in flight (= data convert --parallelism; default: the cluster's CPUs)",
        use_gpu="not applicable: conversion copies JPEG bytes and splitting selects rows, no GPU work; "
                "the flag is refused rather than ignored",
        smoke_test="convert and split a tiny synthetic .rec into OUT-smoke-*",
    )
    p.add_argument("--rec", type=Path, default=None, help="MS1M train.rec (train.idx beside it)")
    p.add_argument("--out", type=Path, default=None, help="output prefix: writes OUT-shards and OUT-<scenario>")
    p.add_argument("--ratio", type=float, default=None, help="split ratio r (config default 0.3)")
    p.add_argument("--scenario", choices=SCENARIOS, action="append", default=None,
                   help="a scenario to split for (repeatable; default: the config's, else all four)")
    return p


def settings(a: argparse.Namespace) -> PrepareConfig:
    """The config file (if any) with the command-line values on top."""
    from dataclasses import replace

    cfg = load_prepare_config(a.config) if a.config is not None else PrepareConfig()
    cfg = replace(cfg, rec=str(a.rec) if a.rec else cfg.rec, out=str(a.out) if a.out else cfg.out,
                  ratio=cfg.ratio if a.ratio is None else a.ratio,
                  scenarios=tuple(a.scenario) if a.scenario else cfg.scenarios)
    return cfg.validate("command line" if a.config is None else f"{a.config} (with flags)")


def done(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def cli_steps(a: argparse.Namespace, cfg: PrepareConfig) -> list[list[str]]:
    """The ``unibct-ray`` command lines still to run (complete outputs are skipped)."""
    ray = ["--address", a.address] if a.address else []
    par = ["--parallelism", str(a.num_workers)] if a.num_workers is not None else []
    steps: list[list[str]] = []
    out, rec, fresh = cfg.out, cfg.rec, []
    if a.smoke_test:
        out = f"{out}{SMOKE_SUFFIX}"
        rec = f"{out}-synth/train.rec"
        fresh = ["--overwrite"]  # a smoke test replaces its previous outputs
        steps.append(["data", "synth", "--out", f"{out}-synth", "--identities", "20", "--images-per-identity", "6",
                      "--size", "32", "--eval-identities", "0", "--overwrite", "--no-progress", *ray])
    if a.smoke_test or not done(f"{out}-shards"):
        steps.append(["data", "convert", "--rec", rec, "--out", f"{out}-shards",
                      "--rows-per-shard", str(40 if a.smoke_test else cfg.rows_per_shard), "--verify", cfg.verify,
                      *par, *fresh, *ray])
    for s in cfg.scenarios:
        if a.smoke_test or not done(f"{out}-{s}"):
            steps.append(["data", "split", "--src", f"{out}-shards", "--scenario", s, "--ratio", str(cfg.ratio),
                          "--out", f"{out}-{s}", *fresh])
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.use_gpu:
        parser.error("--use-gpu: conversion and splitting do no GPU work (JPEG bytes are copied as stored)")

    def body() -> int:
        from unibct_ray.errors import UserError

        cfg = settings(a)
        if not cfg.out:
            raise UserError("--out (or out: in --config) is required")
        if not a.smoke_test and not cfg.rec:
            raise UserError("--rec (or rec: in --config) is required")
        if a.smoke_test and cfg.rec:  # not converted, but at least visible and well-formed
            from unibct_ray.data.ms1m import read_ms1m_header
            from unibct_ray.data.recordio import RecordIOReader

            with RecordIOReader(cfg.rec) as reader:
                h = read_ms1m_header(reader)
            print(f"[{PROG}] smoke test: {cfg.rec} header: {h.num_images} images", flush=True)
        steps = cli_steps(a, cfg)
        if not steps:
            print(f"[{PROG}] {cfg.out}-shards and every split are complete: nothing to do", flush=True)
        return run_cli_steps(steps, a.debug)

    return run_job(PROG, a.debug, body)


if __name__ == "__main__":
    sys.exit(main())
