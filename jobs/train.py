"""Ray job entrypoint: train an old or a compatible new model.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/ms1mv3/open-class/new-unibct.yaml
"""

from __future__ import annotations

import sys

from unibct_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv:  # Ray convention: a tiny run that checks the wiring
        argv.remove("--smoke-test")
        argv += ["--set", "optim.epochs=1"]
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
