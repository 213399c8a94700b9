"""`unibct-ray demo --quick` end to end on the session's local Ray, plus the summary tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unibct_ray.data.synth import SynthSpec, class_sizes
from unibct_ray.demo import SCENARIOS, aggregate, demo_checks, demo_plan

FARS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


def _report(so: float, sn: float, cr: float) -> dict:
    v = {t: {f: x for f in FARS} for t, x in (("self_old", so), ("self_new", sn), ("cross", cr))}
    return {"verification": v}


def test_checks_and_aggregate_against_hand_values():
    res = {"independent": _report(0.4, 0.6, 0.1), "unibct": _report(0.4, 0.5, 0.45)}
    assert [ok for _, ok in demo_checks(res)] == [True, True, True]
    res["independent"] = _report(0.4, 0.35, 0.3)  # worse than old, and compatible-ish
    assert [ok for _, ok in demo_checks(res)] == [False, False, True]
    seeds = [{"open-class": {"unibct": _report(0.4, 0.5, x)}} for x in (0.3, 0.5, 0.7)]
    row = aggregate(seeds)[2]
    assert row == "| open-class | unibct | 3 | 0.400 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.200 | 2/3 |"


def test_summary_table_quotes_1e4_beside_1e3():
    from unibct_ray.demo import _table

    rep = _report(0.4, 0.5, 0.45)
    rep["verification"]["cross"]["1e-4"] = 0.25  # only 1e-4 differs
    rep["identification"] = {t: {"top1": 0.9} for t in ("self_old", "self_new", "cross")}
    head, _, row = _table({"unibct": rep})
    assert "@1e-4 self_old / self_new / cross" in head
    assert "| 0.400 | 0.500 | 0.450 |" in row and "| 0.400 / 0.500 / 0.250 |" in row


def test_every_default_plan_leaves_the_old_model_several_images_per_identity():
    """A data split of 1,000 identities x 2-8 images left the old model 1-2 of each (near chance)."""
    budgets = []
    for sc in SCENARIOS:
        plan = demo_plan(False, sc)
        sizes = class_sizes(SynthSpec(identities=plan.identities, images_per_identity=plan.images_per_identity, seed=0))
        if sc in ("open-data", "extended-data"):  # the first round(r * n) images of every identity (at least one)
            old = [max(1, round(plan.split_ratio * int(n))) for n in sizes]
        else:  # every image of the first round(r * C) identities
            old = [int(n) for n in sizes[:round(plan.split_ratio * len(sizes))]]
        assert min(old) >= 2 and np.mean(old) >= 4.5, (sc, min(old), np.mean(old))
        budgets.append(int(sizes.sum()))
    # about the same number of training images everywhere: the same training time per scenario
    assert max(budgets) < 1.1 * min(budgets), budgets


# Two of the four default methods keep the suite's time down: each training run costs ~30 s of
# Ray Train start-up on 2 cores. They are the two the demo's checks (b) and (c) are about; l2
# and bct run end to end in tests/distributed/test_train_e2e.py.
METHODS = ["independent", "unibct"]


@pytest.mark.slow
def test_demo_quick(ray_session, tmp_path, capsys):
    from unibct_ray.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", *METHODS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["open-class"]
    assert list(summary["open-class"]) == METHODS
    for method, rep in summary["open-class"].items():
        for t in ("self_old", "self_new", "cross"):
            assert set(rep["verification"][t]) == set(FARS), (method, t)
            assert set(rep["identification"][t]) >= {"top1", "top5", "top10"}
    # One old model, its IJB-C features extracted once: self_old is the same number in every report.
    so = {json.dumps(r["verification"]["self_old"]) for r in summary["open-class"].values()}
    assert len(so) == 1
    # The shared caches hold one old-model feature set (unibct's) and 1 + 2 IJB-C feature files.
    assert len([p for p in (out / "cache" / "old-features").iterdir() if not p.name.startswith(".")]) == 1
    assert len(list((out / "cache" / "ijbc-features").glob("features-*.npy"))) == 1 + len(METHODS)
    md = (out / "summary.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in md
    assert (out / "summary.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| unibct |" in printed and "done in" in printed

    # A rerun reuses every finished run (no training) and reproduces the numbers.
    assert main(["demo", "--quick", "--out", str(out), "--methods", *METHODS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 1 + len(METHODS)
    again = json.loads((out / "summary.json").read_text())
    for m in METHODS:
        a, b = summary["open-class"][m]["verification"], again["open-class"][m]["verification"]
        np.testing.assert_equal([a[t][f] for t in a for f in FARS], [b[t][f] for t in b for f in FARS])


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    from unibct_ray.cli import main

    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a demo directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
