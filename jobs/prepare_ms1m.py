"""Ray job entrypoint: MS1Mv3 train.rec -> Parquet shards -> the four upgrade splits.

    ray job submit --working-dir . -- python jobs/prepare_ms1m.py --rec /data/ms1m-retinaface-t1/train.rec \\
        --out /data/ms1mv3 --ratio 0.3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unibct_ray.cli import main as cli_main

SCENARIOS = ("extended-data", "extended-class", "open-data", "open-class")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rec", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="writes OUT-shards and OUT-<scenario>/{old,new}")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--scenario", choices=SCENARIOS, action="append", help="default: all four")
    p.add_argument("--address", default=None)
    p.add_argument("--smoke-test", action="store_true", help="convert only (no splits)")
    a = p.parse_args(argv)
    shards = Path(f"{a.out}-shards")
    ray_flags = ["--address", a.address] if a.address else []
    if not (shards / "manifest.json").exists():
        rc = cli_main(["data", "convert", "--rec", str(a.rec), "--out", str(shards), *ray_flags])
        if rc:
            return rc
    if a.smoke_test:
        return 0
    for s in a.scenario or SCENARIOS:
        rc = cli_main(["data", "split", "--src", str(shards), "--scenario", s, "--ratio", str(a.ratio),
                       "--out", f"{a.out}-{s}"])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
