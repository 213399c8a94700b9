"""Ray job: IJB-C evaluation of an old/new model pair with a compatibility verdict (`unibct-ray eval`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --config jobs/configs/ms1mv3/open-class/new-unibct.yaml --ijbc /data/ijb \\
        --out /shared/reports/open-class-unibct

--config is the NEW model's training config: the new checkpoint is STORAGE/NAME/final.pt and
the old one compat.old_checkpoint (--old-checkpoint / --new-checkpoint override either; without
--config give both, or feature files). --out defaults to STORAGE/NAME/ijbc-report.

--smoke-test evaluates the same checkpoints on a tiny synthetic IJB-C rendered into
OUT-smoke/ijbc (8 subjects, no bootstrap) and writes the report to OUT-smoke: it checks the
wiring (Ray, the extraction actor pool, FAISS shard actors, the checkpoints and OUT visible
from the cluster) in a minute, not the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unibct_ray.jobs import SMOKE_SUFFIX, job_parser, run_cli_steps, run_job

PROG = "jobs/evaluate.py"
# Flags of `unibct-ray eval` that this job sets itself (the rest pass through unchanged).
OWN_FLAGS = ("--actors", "--old-features", "--new-features")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        PROG, __doc__,
        config="the new model's training config: derives --new-checkpoint (STORAGE/NAME/final.pt), "
               "--old-checkpoint (compat.old_checkpoint) and --out (STORAGE/NAME/ijbc-report)",
        num_workers="feature-extraction actors (= unibct-ray eval --actors; default 2)",
        use_gpu="embed on GPU actors and search FAISS shards on GPUs (= unibct-ray eval --use-gpu; "
                "--gpus-per-actor and --batch-size pass through)",
        smoke_test="evaluate the checkpoints on a tiny synthetic IJB-C, report in OUT-smoke",
        epilog="Every other `unibct-ray eval` flag passes through unchanged: --criterion-far, --bootstrap, --seed,\n"
               "--distractors, --distractor-features, --new-distractor-features, --index, --shards, --overwrite,\n"
               "--num-cpus, --gpus-per-actor, --batch-size\n"
               "(see `unibct-ray eval --help`). --old-features/--new-features: use `unibct-ray eval` directly.",
    )
    p.add_argument("--ijbc", type=Path, default=None,
                   help="IJB-C root (required; with --smoke-test optional, its meta is only read as a check)")
    p.add_argument("--old-checkpoint", type=Path, default=None)
    p.add_argument("--new-checkpoint", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="report directory (required without --config)")
    return p


def resolve(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(old checkpoint, new checkpoint, out) from the flags and, if given, the training config."""
    from unibct_ray.errors import UserError

    old, new, out = a.old_checkpoint, a.new_checkpoint, a.out
    if a.config is not None:
        from unibct_ray.config import load_config

        cfg = load_config(a.config)
        run = Path(cfg.storage) / cfg.name
        new = new or run / "final.pt"
        old = old or (Path(cfg.compat.old_checkpoint) if cfg.compat.old_checkpoint else None)
        out = out or run / "ijbc-report"
        if old is None:
            raise UserError(f"{a.config}: no compat.old_checkpoint to compare with: pass --old-checkpoint")
        if a.new_checkpoint is None and not new.is_file():
            raise UserError(f"{new}: not found: train {a.config} first (python jobs/train.py --config {a.config})")
    missing = [f for f, v in (("--old-checkpoint", old), ("--new-checkpoint", new), ("--out", out)) if v is None]
    if missing:
        raise UserError(f"{', '.join(missing)} required without --config")
    return Path(old), Path(new), Path(out)


def smoke_out(out: Path) -> Path:
    return out.with_name(out.name + SMOKE_SUFFIX)


def cli_steps(a: argparse.Namespace, rest: list[str], old: Path, new: Path, out: Path) -> list[list[str]]:
    """The ``unibct-ray`` command lines of this job."""
    ray = ["--address", a.address] if a.address else []
    actors = ["--actors", str(a.num_workers)] if a.num_workers is not None else []
    actors += ["--use-gpu"] if a.use_gpu else []
    if not a.smoke_test:
        return [["eval", "--ijbc", str(a.ijbc), "--old-checkpoint", str(old), "--new-checkpoint", str(new),
                 "--out", str(out), *actors, *ray, *rest]]
    sout = smoke_out(out)
    synth = ["data", "synth", "--out", str(sout / "ijbc"), "--identities", "1", "--images-per-identity", "1",
             "--size", "32", "--eval-identities", "8", "--probes-per-identity", "1", "--impostor-pairs", "100",
             "--overwrite", "--no-progress", *ray]
    return [synth, ["eval", "--ijbc", str(sout / "ijbc"), "--old-checkpoint", str(old), "--new-checkpoint", str(new),
                    "--out", str(sout), "--bootstrap", "0", *actors, *ray, *rest, "--overwrite"]]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    clash = [f for f in rest if f.split("=", 1)[0] in OWN_FLAGS]
    if clash:
        parser.error(f"{clash[0]}: not a flag of this job (--num-workers sets the extraction actors; "
                     "feature files: use `unibct-ray eval`)")
    if a.ijbc is None and not a.smoke_test:
        parser.error("--ijbc is required (the IJB-C root holding IJBC/meta and IJBC/loose_crop)")

    def body() -> int:
        old, new, out = resolve(a)
        if a.smoke_test and a.ijbc is not None:  # not evaluated, but at least visible and well-formed
            from unibct_ray.data.ijbc import read_ijbc_meta

            meta = read_ijbc_meta(a.ijbc)
            print(f"[{PROG}] smoke test: {a.ijbc} meta lists {len(meta.image_names)} images", flush=True)
        return run_cli_steps(cli_steps(a, rest, old, new, out), a.debug)

    return run_job(PROG, a.debug, body)


if __name__ == "__main__":
    sys.exit(main())
