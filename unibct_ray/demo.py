"""The embedded default end to end on a local Ray (synthetic data, CPU).

What runs today: the data stages (synth -> convert -> split). Training, prototype refinement
and the IJB-C evaluation join this demo as they land; until then it says so plainly instead
of pretending.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

__all__ = ["run_demo"]


def run_demo(out: Path, *, overwrite: bool = False) -> int:
    from unibct_ray.data.splits import split_shards
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.synth import synthesize
    from unibct_ray.errors import UserError

    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ensure_ray()
    spec = SynthSpec(identities=100, images_per_identity=20, size=48, eval_identities=100)
    print(f"[demo] 1/3 rendering the synthetic benchmark into {out / 'synth'}")
    s = synthesize(spec, out / "synth")
    print(f"[demo]     {s['train']['images']} training images of {s['train']['identities']} identities, "
          f"{s['ijbc']['images']} IJB-C images / {s['ijbc']['pairs']} pairs")
    print("[demo] 2/3 converting train.rec to Parquet shards")
    m = convert_rec(out / "synth" / "train.rec", out / "shards", rows_per_shard=500)
    print(f"[demo]     {m.rows} rows in {len(m.shards)} shards")
    print("[demo] 3/3 splitting for the open-class upgrade scenario (r = 0.3)")
    sp = split_shards(out / "shards", "open-class", 0.3, out / "open-class")
    print(f"[demo]     old: {sp['old']['rows']} images / {sp['old']['classes']} classes; "
          f"new: {sp['new']['rows']} images / {sp['new']['classes']} classes")
    print(f"[demo] data stages done in {time.perf_counter() - t0:.0f} s.")
    print("[demo] training, prototype refinement and IJB-C evaluation: not yet in this version.")
    return 0
