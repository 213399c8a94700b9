"""Shared pieces of the ``jobs/`` entrypoints (``ray job submit ... -- python jobs/NAME.py``).

Every job takes the Ray-conventional flags ``--config --address --num-workers --use-gpu
--smoke-test`` and turns them into ``unibct-ray`` command lines (pure functions, tested without
Ray). A flag that means nothing for a job is still parsed, so that the job can say why it does
not apply (exit status 2) instead of silently ignoring it. A smoke test never touches a real
output: it writes under the same name with ``-smoke`` appended and replaces its previous run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from unibct_ray.config import read_yaml_mapping
from unibct_ray.errors import ConfigError, UserError

__all__ = ["SMOKE_SUFFIX", "SCENARIOS", "job_parser", "overrides", "run_job", "run_cli_steps", "PrepareConfig",
           "load_prepare_config"]

SMOKE_SUFFIX = "-smoke"
SCENARIOS = ("extended-data", "extended-class", "open-data", "open-class")
EXIT_USER_ERROR = 2

ADDRESS_HELP = ("Ray cluster address, e.g. HEAD_IP:6379 (default: $RAY_ADDRESS, which `ray job submit` "
                "sets; without either a local Ray is started)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def job_parser(prog: str, description: str, *, config: str, num_workers: str, use_gpu: str,
               smoke_test: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the five Ray-conventional flags (plus ``--debug``)."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_Formatter,
                                allow_abbrev=False)
    g = p.add_argument_group("Ray job flags")
    g.add_argument("--config", type=Path, default=None, help=config)
    g.add_argument("--address", default=None, help=ADDRESS_HELP)
    g.add_argument("--num-workers", type=_positive_int, default=None, metavar="N", help=num_workers)
    g.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help=use_gpu)
    g.add_argument("--smoke-test", action="store_true", help=smoke_test)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def overrides(a: argparse.Namespace) -> list[str]:
    """A train-config job's ``--set`` list, then ``--num-workers``/``--use-gpu`` as overrides (later wins)."""
    sets = list(a.set)
    if a.num_workers is not None:
        sets.append(f"num_workers={a.num_workers}")
    if a.use_gpu is not None:
        sets.append(f"use_gpu={'true' if a.use_gpu else 'false'}")
    return sets


def run_job(prog: str, debug: bool, body: Callable[[], int]) -> int:
    """Run ``body``; a ``UserError`` it raises prints as one line and gives exit status 2."""
    try:
        return int(body() or 0)
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def run_cli_steps(steps: Sequence[Sequence[str]], debug: bool) -> int:
    """Run ``unibct-ray`` command lines in order; stop at the first non-zero status."""
    from unibct_ray.cli import main as cli_main

    for argv in steps:
        rc = cli_main([*(["--debug"] if debug else []), *argv])
        if rc:
            return rc
    return 0


# ------------------------------------------------------------------ prepare_ms1m config
@dataclass(frozen=True)
class PrepareConfig:
    """Where the MS1M ``.rec`` is and where its shards and upgrade splits go.

    Writes ``{out}-shards`` and ``{out}-{scenario}/{old,new}`` for each scenario: the paths the
    training configs' ``data.train`` name.
    """

    rec: str = ""
    out: str = ""
    ratio: float = 0.3
    scenarios: tuple[str, ...] = SCENARIOS
    rows_per_shard: int = 50_000
    verify: str = "signature"

    def validate(self, where: str) -> "PrepareConfig":
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {key}: {msg}")

        need(0 < self.ratio < 1, "ratio", f"must be in (0, 1), got {self.ratio}")
        need(len(self.scenarios) > 0, "scenarios", "must name at least one scenario")
        for s in self.scenarios:
            need(s in SCENARIOS, "scenarios", f"{s!r} is not one of {', '.join(SCENARIOS)}")
        need(self.rows_per_shard >= 1, "rows_per_shard", "must be >= 1")
        need(self.verify in ("signature", "header", "decode"), "verify",
             f"must be signature, header or decode, got {self.verify!r}")
        return self


def load_prepare_config(path: str | Path) -> PrepareConfig:
    """Read a prepare YAML strictly: unknown keys and wrong types name the file and the key."""
    p = Path(path)
    data = read_yaml_mapping(p)
    fields = {f.name: f for f in dataclasses.fields(PrepareConfig)}
    kinds = {"rec": (str, "a string"), "out": (str, "a string"), "ratio": ((int, float), "a number"),
             "rows_per_shard": (int, "an integer"), "verify": (str, "a string")}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{p.name}: {key}: unknown key (valid here: {', '.join(sorted(fields))})")
        if key == "scenarios":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ConfigError(f"{p.name}: scenarios: expected a list of scenario names, got {value!r}")
            value = tuple(value)
        elif isinstance(value, bool) or not isinstance(value, kinds[key][0]):
            raise ConfigError(f"{p.name}: {key}: expected {kinds[key][1]}, got {value!r}")
        values[key] = float(value) if key == "ratio" else value
    return PrepareConfig(**values).validate(p.name)
