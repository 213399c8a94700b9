"""``unibct-ray bench NAME``: every measured speed and memory figure, one module per bench.

Each module holds ``add_arguments(parser)`` and ``run(args) -> dict``; the shared timing helper
and the output format (a table, then JSON; ``--json PATH`` keeps it) are in
:mod:`unibct_ray.bench.common`. Every bench also runs as ``python -m unibct_ray.bench.NAME``.
The bench modules import their heavy dependencies (torch, ray, faiss) inside ``run``, so
building the command line stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import importlib

__all__ = ["BENCHES", "add_bench_parser"]

#: name -> (module, one-line help). The order is the order of ``unibct-ray bench --help``.
BENCHES: dict[str, tuple[str, str]] = {
    "convert": ("unibct_ray.bench.convert", "data convert vs a plain sequential read of the same .rec"),
    "pipeline": ("unibct_ray.bench.pipeline", "Ray Data -> TorchTrainer vs a plain DataLoader loop"),
    "head": ("unibct_ray.bench.head", "replicated vs model-parallel margin head: bytes all-reduced, step time"),
    "shuffle": ("unibct_ray.bench.shuffle", "distinct classes per global batch vs a uniform permutation"),
    "memory": ("unibct_ray.bench.memory", "peak memory of the training input pipeline under a small object store"),
    "refine": ("unibct_ray.bench.refine", "vectorised prototype refinement vs a per-class loop"),
    "search": ("unibct_ray.bench.search", "FAISS gallery shards on Ray actors vs one index"),
    "eval": ("unibct_ray.bench.eval", "the IJB-C evaluator vs the public algorithm at full IJB-C scale"),
    "plan": ("unibct_ray.bench.plan", "the resource plan's memory estimates vs measured worker/actor peaks"),
    "recipe": ("unibct_ray.bench.recipe", "in-process recipe probe: old vs new model TAR without Ray"),
    "prototypes-oracle": ("unibct_ray.bench.oracle", "mean vs row vs column prototypes against the true class centre"),
    "science": ("unibct_ray.bench.science", "methods over seeds on noisy data, TAR@1e-4 on the science IJB-C"),
    "extract": ("unibct_ray.bench.extract", "feature extraction on the Ray actor pool vs a plain one-process loop"),
    "gpu": ("unibct_ray.bench.gpu", "GPU check: Ray Train, extraction, refinement vs plain loops; pytest -m gpu"),
}


def _run(name: str, module: str, a: argparse.Namespace) -> int:
    from unibct_ray.bench.common import emit, exit_status

    result = importlib.import_module(module).run(a)
    emit(name, result, a.json)
    return exit_status(result)  # 1 when the result reports a failed check (``ok: false``)


def add_bench_parser(sub: argparse._SubParsersAction, formatter: type, subcommands: bool = True) -> None:
    """Register ``bench`` and one subcommand per entry of :data:`BENCHES`.

    ``subcommands=False``: ``bench`` alone, for a command line whose command is another one (the
    subcommands' options need every bench module imported: ~0.7 s that ``eval`` would pay).
    """
    width = max(len(name) for name in BENCHES)
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in BENCHES.items())
    bench = sub.add_parser("bench", help="speed and memory benchmarks (figures quoted in the README)",
                           formatter_class=formatter,
                           description="Speed and memory benchmarks, each measured side by side in one run.\n"
                                       "Output: a table, then the same result as JSON (--json PATH keeps it).\n\n"
                                       + listing)
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    if not subcommands:
        return
    from unibct_ray.bench.common import add_output_arguments

    for name, (module, text) in BENCHES.items():
        mod = importlib.import_module(module)
        description = getattr(mod, "DESCRIPTION", None) or (mod.__doc__ or text)
        p = bsub.add_parser(name, help=text, description=description, formatter_class=formatter)
        mod.add_arguments(p)
        add_output_arguments(p)
        p.set_defaults(run=functools.partial(_run, name, module))
