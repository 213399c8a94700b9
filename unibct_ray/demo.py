"""The embedded default end to end on a local Ray (synthetic data, CPU, a few minutes).

1. render a synthetic MS1M ``.rec`` + IJB-C folder; 2. convert to Parquet shards; 3. split
for an upgrade scenario; 4. train the old model; 5. train a UniBCT new model (prototype
refinement on actors between epochs); 6. evaluate self_old / self_new / cross on IJB-C and
write the report. The configs are ``jobs/configs/synthetic/*.yaml``, the same files a user
edits; every step is the same code the CLI runs on real data.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

__all__ = ["run_demo", "DEMO_CONFIGS"]

DEMO_CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "synthetic"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: Path, *, overwrite: bool = False, scenario: str = "open-class", method: str = "unibct") -> int:
    from unibct_ray.config import load_config
    from unibct_ray.data.splits import split_shards
    from unibct_ray.data.synth import SynthSpec
    from unibct_ray.distributed.convert import convert_rec
    from unibct_ray.distributed.evaluate import EvalArgs, run_eval
    from unibct_ray.distributed.runtime import ensure_ray
    from unibct_ray.distributed.synth import synthesize
    from unibct_ray.distributed.train import train
    from unibct_ray.errors import UserError

    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    if not DEMO_CONFIGS.is_dir():
        raise UserError(f"{DEMO_CONFIGS}: demo configs not found (run from a checkout of the project)")
    t0 = time.perf_counter()
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False

    spec = SynthSpec(identities=100, images_per_identity=30, size=48, eval_identities=100)
    _say(f"1/6 rendering the synthetic benchmark into {out / 'synth'}")
    s = synthesize(spec, out / "synth")
    _say(f"    {s['train']['images']} training images of {s['train']['identities']} identities; IJB-C: "
         f"{s['ijbc']['images']} images, {s['ijbc']['templates']} templates, {s['ijbc']['pairs']} pairs")
    _say("2/6 converting train.rec to Parquet shards")
    m = convert_rec(out / "synth" / "train.rec", out / "shards", rows_per_shard=500)
    _say(f"    {m.rows} rows in {len(m.shards)} shards")
    _say(f"3/6 splitting for the {scenario} upgrade scenario (r = 0.3)")
    sp = split_shards(out / "shards", scenario, 0.3, out / scenario, progress=False)
    _say(f"    old: {sp['old']['rows']} images / {sp['old']['classes']} classes; "
         f"new: {sp['new']['rows']} images / {sp['new']['classes']} classes")

    runs = out / "runs"
    old_cfg = load_config(DEMO_CONFIGS / "old.yaml",
                          [f"data.train={out / scenario / 'old'}", f"storage={runs}"])
    _say(f"4/6 training the old model ({old_cfg.model.backbone}, {old_cfg.optim.epochs} epochs, "
         f"{old_cfg.num_workers} Ray Train workers)")
    old = train(old_cfg)
    new_cfg = load_config(DEMO_CONFIGS / f"new-{method}.yaml",
                          [f"data.train={out / scenario / 'new'}", f"storage={runs}",
                           f"compat.old_checkpoint={old.checkpoint}"])
    _say(f"5/6 training the new model with {method} (refinement at epochs {list(new_cfg.compat.refine_epochs)})")
    new = train(new_cfg)
    _say("6/6 evaluating on the synthetic IJB-C: self_old, self_new, cross")
    report = run_eval(EvalArgs(ijbc=out / "synth", out=out / "report", old_checkpoint=old.checkpoint,
                               new_checkpoint=new.checkpoint, bootstrap=100))
    far = "1e-4"
    v = report["verification"]
    _say(f"    TAR@FAR={far}: self_old {v['self_old'][far]:.3f}  self_new {v['self_new'][far]:.3f}  "
         f"cross {v['cross'][far]:.3f}")
    i = report["identification"]
    _say(f"    1:N top-1:     self_old {i['self_old']['top1']:.3f}  self_new {i['self_new']['top1']:.3f}  "
         f"cross {i['cross']['top1']:.3f}")
    _say(f"    compatible (cross > self_old at FAR {far}, bootstrap interval above 0): {report['compatible']}")
    _say(f"done in {time.perf_counter() - t0:.0f} s: {out / 'report' / 'report.md'}, roc.png, cmc.png")
    return 0
