"""Ray job entrypoint: IJB-C evaluation (self_old, self_new, cross) with a compatibility verdict.

    ray job submit --working-dir . -- python jobs/evaluate.py --ijbc /data/ijb --old-checkpoint OLD.pt \\
        --new-checkpoint NEW.pt --out reports/open-class-unibct
"""

from __future__ import annotations

import sys

from unibct_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv:
        argv.remove("--smoke-test")
        argv += ["--bootstrap", "0"]
    return cli_main(["eval", *argv])


if __name__ == "__main__":
    sys.exit(main())
