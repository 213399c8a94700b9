"""The science run: its paired statistics against scipy and hand values, and the quick form end to end."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from unibct_ray.bench.science import aggregate_seeds, paired_t

FARS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


def _rep(so: float, sn: float, cr: float, top: float = 0.5) -> dict:
    v = {t: {f: x for f in FARS} for t, x in (("self_old", so), ("self_new", sn), ("cross", cr))}
    return {"verification": v, "identification": {t: {"top1": top} for t in v}}


def test_paired_t_against_scipy():
    d = [0.02, -0.01, 0.04, 0.03, 0.00]
    p = paired_t(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert p["mean"] == pytest.approx(np.mean(d)) and p["ci95"] == pytest.approx([lo, hi])
    # two seeds by hand: mean 0.1, sd = 0.1 * sqrt(2), t_{1, .975} = 12.706
    q = paired_t([0.0, 0.2])
    assert q["ci95"] == pytest.approx([0.1 - 12.7062 * 0.1, 0.1 + 12.7062 * 0.1], abs=1e-4)
    assert paired_t([0.3])["ci95"] is None and paired_t([])["mean"] is None


def test_aggregate_against_hand_values():
    reports = {"bct": {0: _rep(0.4, 0.6, 0.40), 1: _rep(0.4, 0.7, 0.50)},
               "unibct": {0: _rep(0.4, 0.6, 0.45), 1: _rep(0.4, 0.5, 0.60)}}
    agg = aggregate_seeds(reports)
    row = agg["methods"]["unibct"]
    assert row["cross@1e-4"]["mean"] == pytest.approx(0.525)
    assert row["cross@1e-4"]["sd"] == pytest.approx(0.075 * math.sqrt(2))
    assert row["self_new@1e-3"]["mean"] == pytest.approx(0.55) and row["self_old@top1"]["sd"] == 0
    cmp = agg["paired"]["unibct-vs-bct"]
    assert cmp["cross@1e-4"]["diffs"] == [0.05, 0.1]
    assert cmp["cross-self_old@1e-3"]["mean"] == pytest.approx(0.075)
    assert cmp["self_new@1e-4"]["diffs"] == [0.0, -0.2]
    assert "unibct-vs-l2" not in agg["paired"]


def test_plot_science_draws_every_method_and_seed(tmp_path):
    from PIL import Image

    from unibct_ray.bench.science import plot_science

    reports = {m: {s: _rep(0.40, 0.60 + 0.05 * s, 0.30 + 0.1 * i + 0.02 * s) for s in range(3)}
               for i, m in enumerate(("independent", "bct", "unibct"))}
    result = {"scenario": "extended-class", "seeds": [0, 1, 2], "aggregate": aggregate_seeds(reports),
              "per_seed": {m: {str(s): {f"{t}@{far}": r["verification"][t][far] for t in ("self_old", "self_new", "cross")
                                        for far in ("1e-4", "1e-3")} for s, r in by.items()} for m, by in reports.items()}}
    path = tmp_path / "science.png"
    plot_science(result, path)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (396, 814, 3)  # (3.6 x 7.4 in) x 110 dpi
    # the cross dots (pure #d62728) are drawn: 3 methods x 3 seeds x 2 panels
    red = (np.abs(img - [0xD6, 0x27, 0x28]).sum(axis=2) < 30).sum()
    assert red > 18 * 4
    assert not list(tmp_path.glob(".*tmp*"))


def _science(argv: list[str]) -> str:
    """``unibct-ray bench science`` in its own process and its own local Ray: the suite's shared
    Ray session, after the other benches' placement groups and actors, twice crashed its raylet
    in this test (a Ray check failure in HandleRequestWorkerLease), which no run alone showed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "unibct_ray.cli", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_science_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sci"
    argv = ["bench", "science", "--quick", "--out", str(out), "--methods", "bct", "unibct",  # + a sweep at x0.3
            "--num-cpus", "4"]
    _science(argv)
    res = json.loads((out / "science.json").read_text())
    assert res["seeds"] == [0, 1] and set(res["aggregate"]["methods"]) == {"bct", "unibct"}
    assert res["ijbc"]["genuine_pairs"] == 40 * 3 and res["ijbc"]["impostor_pairs"] == 4000
    for m in ("bct", "unibct"):
        per = res["per_seed"][m]
        assert set(per) == {"0", "1"}
        # the reported mean is the mean of the per-seed values
        assert res["aggregate"]["methods"][m]["cross@1e-3"]["mean"] == pytest.approx(
            np.mean([per[s]["cross@1e-3"] for s in per]))
    c = res["aggregate"]["paired"]["unibct-vs-bct"]["cross@1e-4"]
    assert c["n"] == 2 and c["ci95"] is not None
    md = (out / "science.md").read_text()
    assert "| unibct |" in md and "unibct-vs-bct" in md
    assert (out / "science.png").stat().st_size > 5_000
    # The evaluations read the features the one pass before them cached: no feature file is
    # written again after the first report (they used to be re-embedded per evaluation).
    feats = [p.stat().st_mtime for p in (out / "cache" / "ijbc-features").glob("features-*.npy")]
    reports = [p.stat().st_mtime for p in (out / "extended-class" / "quick" / "eval").glob("*/*/report.json")]
    assert len(feats) == 1 + 2 * 2 + 2 and len(reports) == 2 * 2 + 2
    assert max(feats) <= min(reports)
    # a rerun reuses every finished run and evaluation; with --chain it trains only each
    # (method, seed)'s v3 and scores the v1 -> v2 -> v3 matrices
    printed = _science([*argv, "--chain"])
    assert printed.count("reusing the finished run") == 1 + 2 * 2 + 2
    again = json.loads((out / "science.json").read_text())
    assert again["per_seed"] == res["per_seed"] and again["tradeoff"] == res["tradeoff"]
    for m in ("bct", "unibct"):
        pairs = again["chain"][m]
        assert set(pairs) == {"v2 -> v1", "v3 -> v2", "v3 -> v1"}
        # v2 -> v1 is each seed's own cross - self_old at 1e-4 from the single-pair evaluations
        per = res["per_seed"][m]
        assert pairs["v2 -> v1"]["diff@1e-4"]["diffs"] == pytest.approx(
            [round(per[s]["cross@1e-4"] - per[s]["self_old@1e-4"], 4) for s in ("0", "1")], abs=1e-4)
        assert all(0 <= pairs[p]["compatible"] <= 2 and pairs[p]["seeds"] == 2 for p in pairs)
        assert (out / "extended-class" / "quick" / "chain" / m / "seed-1" / "matrix.json").is_file()
    assert "| unibct |" in (out / "science.md").read_text().split("Multi-step upgrades")[1]
    # the trade-off: weight x0.3 and the configured weight (x1 = the seed-0 run) per method
    for m in ("bct", "unibct"):
        pts = res["tradeoff"][m]
        assert [p["factor"] for p in pts] == [0.3, 1.0]
        assert pts[1]["cross"] == res["per_seed"][m]["0"]["cross@1e-4"]
    assert (out / "tradeoff.png").stat().st_size > 5_000
