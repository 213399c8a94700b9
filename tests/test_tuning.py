"""The Ray-free half of `unibct-ray tune`: tune files, the objective, the Pareto front, the outputs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unibct_ray.config import load_config
from unibct_ray.errors import ConfigError
from unibct_ray.tuning import (TrialRecord, load_tune_spec, objective_value, pareto_front, write_outputs)

ROOT = Path(__file__).resolve().parent.parent
SYNTH_TUNE = ROOT / "jobs" / "configs" / "synthetic" / "tune-unibct.yaml"


def brute_force_front(points: list[tuple[float, float]]) -> set[int]:
    """Every point no other point dominates (>= in both, > in one), NaN points excluded."""
    ok = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    return {i for i in ok
            if not any(points[j][0] >= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i]
                       for j in ok)}


def test_pareto_front_by_hand():
    pts = [(0.5, 0.5), (0.6, 0.4), (0.4, 0.6), (0.45, 0.45), (0.6, 0.3), (0.5, 0.5), (float("nan"), 0.9)]
    # (0.45, 0.45) is dominated by (0.5, 0.5); (0.6, 0.3) by (0.6, 0.4); the two (0.5, 0.5) tie and stay.
    assert pareto_front(pts) == [1, 0, 5, 2]
    assert pareto_front([]) == []
    assert pareto_front([(0.1, 0.2)]) == [0]


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # a coarse grid makes ties in one or both coordinates common
    pts = [(float(x), float(y)) for x, y in rng.integers(0, 6, size=(n, 2)) / 5]
    if seed % 3 == 0:
        pts[0] = (float("nan"), 1.0)
    front = pareto_front(pts)
    assert set(front) == brute_force_front(pts)
    assert len(front) == len(set(front))
    assert [pts[i][0] for i in front] == sorted((pts[i][0] for i in front), reverse=True)


def test_objective_puts_every_feasible_trial_first():
    floor = 0.3
    tars = np.linspace(0, 1, 11)
    feasible = [objective_value(c, s, floor) for c, s in itertools.product(tars, tars) if s >= floor]
    infeasible = [objective_value(c, s, floor) for c, s in itertools.product(tars, tars) if s < floor]
    assert min(feasible) > max(infeasible)
    assert objective_value(0.7, 0.5, floor) == 0.7  # feasible: the cross TAR itself
    # below the floor, nearer is better, whatever cross is
    assert objective_value(0.0, 0.25, floor) > objective_value(0.9, 0.1, floor)


# ------------------------------------------------------------------ tune files
def tune_file(tmp: Path, **changes) -> Path:
    data = {
        "name": "t", "storage": str(tmp / "tune"), "base": str(SYNTH_TUNE.parent / "new-unibct.yaml"),
        "overrides": {"optim.epochs": 12}, "validation": str(tmp / "val"), "far": 1e-3,
        "old_checkpoint": str(tmp / "old.pt"),
        "space": {"compat.weight": {"loguniform": [0.3, 3.0]}, "compat.refine_epochs": {"choice": [[4, 8], [6]]},
                  "compat.margin": {"uniform": [0.0, 0.3]}, "optim.epochs": {"int": [10, 12]}},
    }
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    p = tmp / "tune.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_tune_file_loads_and_samples_valid_configs():
    import optuna

    spec = load_tune_spec(SYNTH_TUNE)
    assert spec.objective == "cross" and spec.far == 1e-3
    assert {p.key for p in spec.space} >= {"compat.weight", "compat.scale", "compat.margin", "compat.lam",
                                           "compat.temperature", "compat.refine_epochs"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dists = spec.optuna_space()
    for i in range(20):
        trial = study.ask(fixed_distributions=dists)
        params = spec.decode(trial.params)
        cfg = spec.train_config(params, name=f"t{i}")
        assert list(cfg.compat.refine_epochs) in [[2, 6], [4, 8], [3, 6, 9], [6]]
        lo, hi = spec.param("compat.weight").low, spec.param("compat.weight").high
        assert lo <= cfg.compat.weight <= hi and cfg.compat.lam == params["compat.lam"]
        study.tell(trial, 0.0)


def test_spec_paths_and_overrides(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path, far="1e-2"))  # written as `far: 1e-2`: YAML 1.1 says
    assert spec.far == 1e-2                                  # string, the tune loader (YAML 1.2) a number
    assert spec.base_config["optim"]["epochs"] == 12
    assert spec.base_config["compat"]["old_checkpoint"] == str(tmp_path / "old.pt")
    assert Path(spec.base_config["data"]["train"]).is_absolute()
    assert spec.experiment_dir == tmp_path / "tune" / "t"
    cfg = spec.train_config({"optim.epochs": 10, "compat.refine_epochs": [6]}, name="x", storage="/s")
    assert (cfg.name, cfg.storage, cfg.optim.epochs, cfg.compat.refine_epochs) == ("x", "/s", 10, (6,))


def test_shorter_sweep_clamps_refine_epochs_like_train(tmp_path):
    space = {"compat.weight": {"loguniform": [0.3, 3.0]},
             "compat.refine_epochs": {"choice": [[2, 6], [4, 8], [3, 6, 9], [6]]}}
    notes: list[str] = []
    spec = load_tune_spec(tune_file(tmp_path, space=space), sets=["optim.epochs=4"], note=notes.append)
    # base [2, 6] -> [2]; choices: [2, 6] -> [2], [4, 8] -> none left -> 4 // 2 = [2], [3, 6, 9] -> [3],
    # [6] -> [2]; equal ones merged
    assert spec.base_config["compat"]["refine_epochs"] == [2]
    assert spec.param("compat.refine_epochs").choices == ([2], [3])
    assert notes == [
        "tune.yaml: overrides and --set: compat.refine_epochs [2, 6] -> [2] (optim.epochs is 4; "
        "a refinement must come before the last epoch)",
        "tune.yaml: space.compat.refine_epochs [[2, 6], [4, 8], [3, 6, 9], [6]] -> [[2], [3]] (optim.epochs is 4; "
        "a refinement must come before the last epoch)"]
    assert spec.train_config({"compat.refine_epochs": [3]}, name="x").compat.refine_epochs == (3,)
    # at the file's 12 epochs every choice fits: nothing changes, nothing is said
    notes.clear()
    spec = load_tune_spec(tune_file(tmp_path, space=space), note=notes.append)
    assert spec.param("compat.refine_epochs").choices == ([2, 6], [4, 8], [3, 6, 9], [6]) and notes == []
    # epochs searched too: each trial's config is clamped to its own epochs
    spec = load_tune_spec(tune_file(tmp_path, space={**space, "optim.epochs": {"int": [3, 12]}}), note=notes.append)
    assert spec.param("compat.refine_epochs").choices == ([2, 6], [4, 8], [3, 6, 9], [6]) and notes == []
    cfg = spec.train_config({"optim.epochs": 3, "compat.refine_epochs": [4, 8]}, name="x")
    assert cfg.compat.refine_epochs == (1,)


@pytest.mark.parametrize("change,needle", [
    ({"colour": 1}, "tune.yaml: colour: unknown key"),
    ({"validation": None}, "tune.yaml: validation: required"),
    ({"far": 2e-3}, "tune.yaml: far: must be one of"),
    ({"objective": "best"}, "tune.yaml: objective: must be one of cross, pareto"),
    ({"self_new_floor": 1.5}, "tune.yaml: self_new_floor: must be a TAR in [0, 1]"),
    ({"base": "nope.yaml"}, "tune.yaml: base: train config"),
    ({"overrides": {"optim.lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
    ({"space": {}}, "tune.yaml: space: needs at least one key"),
    ({"space": {"compat.wieght": {"uniform": [0.1, 1.0]}}}, "space.compat.wieght = 0.1: compat.wieght: unknown key"),
    ({"space": {"compat.weight": {"gaussian": [0.1, 1.0]}}}, "tune.yaml: space.compat.weight: expected one of uniform"),
    ({"space": {"compat.weight": {"uniform": [1.0, 0.1]}}}, "space.compat.weight: low 1.0 must be below high 0.1"),
    ({"space": {"compat.weight": {"uniform": [0.1]}}}, "space.compat.weight: uniform needs [low, high]"),
    ({"space": {"compat.weight": {"loguniform": [0.0, 1.0]}}}, "space.compat.weight: loguniform needs low > 0"),
    ({"space": {"optim.epochs": {"int": [2.5, 5]}}}, "space.optim.epochs: int bounds must be integers"),
    ({"space": {"compat.lam": {"uniform": [0.5, 1.2]}}}, "space.compat.lam = 1.2: compat.lam: must be a finite number in (0, 1)"),
    ({"space": {"compat.refine_epochs": {"choice": [[4, 8], [0]]}}},
     "space.compat.refine_epochs = [0]: compat.refine_epochs: every epoch must be in 1..11"),
    ({"space": {"compat.refine_epochs": {"choice": []}}}, "space.compat.refine_epochs: choice needs a non-empty list"),
    ({"space": {"compat.axis": {"choice": ["row", "diagonal"]}}}, "space.compat.axis = 'diagonal': compat.axis"),
    ({"space": {"data.train": {"choice": ["a", "b"]}}}, "space.data.train: cannot be searched"),
    ({"asha": {"grace_period": 0}}, "tune.yaml: asha.grace_period: expected an integer >= 1"),
    ({"asha": {"grace": 2}}, "tune.yaml: asha.grace: unknown key"),
    ({"asha": {"grace_period": 4}, "objective": "pareto"}, "tune.yaml: asha: early stopping needs a single objective"),
])
def test_bad_tune_files_name_the_file_and_key(tmp_path, change, needle):
    with pytest.raises(ConfigError) as e:
        load_tune_spec(tune_file(tmp_path, **change))
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1


def test_missing_old_checkpoint_and_cli_overrides(tmp_path):
    base = yaml.safe_load((SYNTH_TUNE.parent / "new-unibct.yaml").read_text())
    base["compat"].pop("old_checkpoint")
    base["compat"]["method"] = "independent"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="tune.yaml: old_checkpoint: required"):
        load_tune_spec(tune_file(tmp_path, base="base.yaml", old_checkpoint=None))
    spec = load_tune_spec(tune_file(tmp_path), objective="pareto", max_concurrent=3)
    assert (spec.objective, spec.max_concurrent) == ("pareto", 3)
    with pytest.raises(ConfigError, match="max_concurrent: must be >= 1"):
        load_tune_spec(tune_file(tmp_path), max_concurrent=0)


def test_spec_survives_json(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path, asha={"grace_period": 4, "reduction_factor": 3}))
    again = type(spec).from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec
    assert again.decode({"compat.refine_epochs": "[4, 8]"}) == {"compat.refine_epochs": [4, 8]}


# ------------------------------------------------------------------ outputs
def records(spec) -> list[TrialRecord]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(9):
        c, s = (float(v) for v in np.round(rng.uniform(0.2, 0.8, 2), 2))
        out.append(TrialRecord(f"t{i:02d}", "TERMINATED", {"compat.weight": 0.5 + i / 10, "compat.refine_epochs": [4, 8],
                                                          "compat.margin": 0.1, "optim.epochs": 12},
                               cross=c, self_new=s, self_old=0.4, objective=objective_value(c, s, spec.self_new_floor),
                               epoch=12, final=True))
    out.append(TrialRecord("t09", "RUNNING", {"compat.weight": 1.0}))
    out.append(TrialRecord("t10", "ERROR", {"compat.weight": 2.0}, error="RuntimeError: out of memory"))
    out.append(TrialRecord("t11", "TERMINATED", {"compat.weight": 2.5}, cross=0.99, self_new=0.99, self_old=0.4,
                           objective=0.99, epoch=4, final=False))  # stopped early: never the best
    return out


def test_outputs_cross(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path, self_new_floor=0.5))
    recs = records(spec)
    summary = write_outputs(spec, recs, tmp_path / "exp", num_samples=12, done=True)
    feasible = [r for r in recs[:9] if r.self_new >= 0.5]
    best = max(feasible, key=lambda r: r.cross)
    assert summary["best"] == best.trial_id
    cfg = load_config(tmp_path / "exp" / "best.yaml")
    assert cfg.compat.weight == best.params["compat.weight"] and cfg.name == f"{spec.base_config['name']}-{best.trial_id}"
    assert cfg.storage == spec.base_config["storage"]
    doc = json.loads((tmp_path / "exp" / "trials.json").read_text())
    assert doc["counts"] == {"TERMINATED": 9, "RUNNING": 1, "ERROR": 1, "STOPPED": 1}
    assert [t["trial_id"] for t in doc["trials"]] == [r.trial_id for r in recs]
    md = (tmp_path / "exp" / "tune.md").read_text()
    assert f"| {best.trial_id} **best** | TERMINATED |" in md and "t10: RuntimeError: out of memory" in md
    assert "| t11 | STOPPED |" in md
    assert not (tmp_path / "exp" / "pareto").exists()
    assert Image.open(tmp_path / "exp" / "pareto.png").size[0] > 100


def test_outputs_cross_nothing_feasible(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path, self_new_floor=0.95))
    summary = write_outputs(spec, records(spec), tmp_path / "exp", num_samples=12, done=True)
    assert summary["best"] is None and not (tmp_path / "exp" / "best.yaml").exists()
    assert "No complete trial reached self_new >= 0.95" in (tmp_path / "exp" / "tune.md").read_text()


def test_outputs_pareto_follow_the_front(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path, objective="pareto"))
    recs = records(spec)
    out = tmp_path / "exp"
    (out / "pareto").mkdir(parents=True)
    (out / "pareto" / "stale.yaml").write_text("name: old\n")  # a trial that has left the front
    summary = write_outputs(spec, recs, out, num_samples=12, done=False)
    pts = [(r.cross, r.self_new) for r in recs[:9]]
    expect = {recs[i].trial_id for i in brute_force_front(pts)}
    assert set(summary["pareto"]) == expect and summary["best"] is None
    assert {f.stem for f in (out / "pareto").glob("*.yaml")} == expect
    for t in expect:
        rec = next(r for r in recs if r.trial_id == t)
        cfg = load_config(out / "pareto" / f"{t}.yaml")
        assert cfg.compat.weight == rec.params["compat.weight"] and cfg.compat.refine_epochs == (4, 8)
    md = (out / "tune.md").read_text()
    assert "(experiment still running)" in md and "## Pareto front" in md
    assert not (out / "best.yaml").exists()


@pytest.mark.parametrize("method", ["nccl", "advbct", "mixbct"])
@pytest.mark.parametrize("where", ["synthetic", "ms1mv3/open-class"])
def test_method_tune_files_search_their_own_keys(method, where):
    spec = load_tune_spec(ROOT / "jobs" / "configs" / where / f"tune-{method}.yaml")
    keys = [p.key for p in spec.space]
    assert keys and all(k == "compat.weight" or k.startswith(f"compat.{method}_") for k in keys), keys
    # both ends of every range are valid train configs of that method
    for end in ("low", "high"):
        cfg = spec.train_config({p.key: getattr(p, end) for p in spec.space}, name=spec.name)
        assert cfg.compat.method == method
