"""Hyper-parameter sweeps without Ray: the tune file, the objective, the Pareto front, the outputs.

A tune file (YAML, strict like the train configs) names a base train config and the dotted
keys to search::

    name: synthetic-tune-unibct
    storage: demo_out/tune                 # the experiment directory is STORAGE/NAME
    base: new-unibct.yaml                  # train config, relative to this file
    overrides: {optim.epochs: 12}          # dotted keys set on the base before sampling
    old_checkpoint: demo_out/runs/synthetic-old/final.pt   # default: the base's compat.old_checkpoint
    validation: demo_out/val               # IJB-C folder of held-out identities
    far: 1e-3                              # TAR is read at this FAR (one of 1e-6 .. 1e-1)
    self_new_floor: 0.0                    # objective cross: self_new must reach this
    objective: cross                       # cross | pareto
    max_concurrent: 1
    seed: 0                                # Optuna's TPE sampler
    eval_actors: 1                         # feature-extraction actors of each validation run
    asha: {grace_period: 8, reduction_factor: 2}   # optional, objective cross only
    space:
      compat.weight: {loguniform: [0.3, 3.0]}
      compat.margin: {uniform: [0.0, 0.3]}
      optim.epochs: {int: [10, 14]}        # inclusive bounds
      compat.refine_epochs: {choice: [[4, 8], [6]]}

Every path except ``base`` is read like the paths of a train config (relative to the working
directory) and stored absolute. Each search value is checked at load time by building the
train config it would give (with the other keys at their base values), so a bad key or value
stops the sweep before any trial starts, with one line naming the file and the key.

The Ray side (``unibct_ray.distributed.tune``) runs the trials; this module turns their
results into ``trials.json``, ``tune.md``, ``best.yaml`` or ``pareto/<trial>.yaml`` and
``pareto.png``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from unibct_ray.config import (TrainConfig, apply_overrides, clamp_refine_epochs, from_dict, load_config,
                               read_yaml_mapping, to_dict)
from unibct_ray.data.shards import atomic_write_text
from unibct_ray.errors import ConfigError
from unibct_ray.tune_signature import verify_experiment

__all__ = ["SPACE_KINDS", "OBJECTIVES", "SearchParam", "AshaSpec", "TuneSpec", "TrialRecord",
           "read_tune_file", "load_tune_spec", "check_validation", "open_experiment", "SPEC_FILE", "TRIALS_DIR",
           "objective_value", "pareto_front", "write_outputs"]

SPACE_KINDS = ("uniform", "loguniform", "int", "choice")
OBJECTIVES = ("cross", "pareto")
#: FARs the evaluation report holds (``unibct_ray.metrics.verification.FARS``).
_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Keys a trial sets itself, or that would change the old-model features shared by all trials.
_FIXED_KEYS = ("name", "storage", "data.train", "compat.old_checkpoint")
_TOP_KEYS = ("name", "storage", "base", "overrides", "old_checkpoint", "validation", "far",
             "self_new_floor", "objective", "max_concurrent", "seed", "eval_actors", "asha", "space")


def _json_value(v: Any) -> str:
    """A value as an override string (JSON is YAML, so ``apply_overrides`` parses it back)."""
    return json.dumps(list(v) if isinstance(v, tuple) else v)


@dataclass(frozen=True)
class SearchParam:
    """One searched dotted key: ``uniform``/``loguniform`` floats in [low, high], ``int`` in
    [low, high] (both inclusive), or ``choice`` among values (which may be lists)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def encode(self, value: Any) -> Any:
        """Optuna's categorical values must be scalars: a list choice travels as its JSON text."""
        return json.dumps(value) if isinstance(value, (list, dict)) else value

    def decode(self, sampled: Any) -> Any:
        if self.kind == "choice":
            table = {self.encode(c): c for c in self.choices}
            if sampled not in table:
                raise ValueError(f"{self.key}: {sampled!r} is not one of the choices {list(self.choices)}")
            return table[sampled]
        if self.kind == "int":
            return int(sampled)
        return float(sampled)

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "uniform":
            return FloatDistribution(float(self.low), float(self.high))
        if self.kind == "loguniform":
            return FloatDistribution(float(self.low), float(self.high), log=True)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return CategoricalDistribution([self.encode(c) for c in self.choices])

    def candidates(self) -> list[Any]:
        """Values checked at load time: both bounds, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        return f"choice {list(self.choices)}" if self.kind == "choice" else f"{self.kind} [{self.low}, {self.high}]"


@dataclass(frozen=True)
class AshaSpec:
    """ASHA early stopping: rungs at the training-phase ends (UniBCT refinement epochs)."""

    grace_period: int = 1        # epochs a trial runs before it may be stopped
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class TuneSpec:
    """A validated tune file. ``base_config`` is the base train config with the overrides and
    the old checkpoint applied, as plain data with absolute paths."""

    source: str
    name: str
    storage: str
    base: str
    base_config: dict
    validation: str
    old_checkpoint: str
    space: tuple[SearchParam, ...]
    far: float = 1e-3
    self_new_floor: float = 0.0
    objective: str = "cross"
    max_concurrent: int = 1
    seed: int = 0
    eval_actors: int = 1
    asha: AshaSpec | None = None

    @property
    def where(self) -> str:
        return Path(self.source).name

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage) / self.name

    def param(self, key: str) -> SearchParam:
        return next(p for p in self.space if p.key == key)

    def optuna_space(self) -> dict[str, Any]:
        """{dotted key: Optuna distribution} for ``OptunaSearch(space=...)``."""
        return {p.key: p.distribution() for p in self.space}

    def decode(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Values as the sampler gives them -> {dotted key: train config value}."""
        return {p.key: p.decode(sampled[p.key]) for p in self.space if p.key in sampled}

    def train_config(self, params: Mapping[str, Any], *, name: str, storage: str | None = None) -> TrainConfig:
        """The train config of one trial: the base with the (decoded) ``params`` set."""
        sets = [f"{k}={_json_value(v)}" for k, v in params.items()]
        sets += [f"name={json.dumps(name)}", f"storage={json.dumps(storage or self.base_config['storage'])}"]
        where = f"{self.where} ({', '.join(f'{k}={v!r}' for k, v in params.items()) or 'base'})"
        return from_dict(apply_overrides(self.base_config, sets, where), where)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TuneSpec":
        d = dict(data)
        d["space"] = tuple(SearchParam(**{**p, "choices": tuple(p["choices"])}) for p in d["space"])
        d["asha"] = AshaSpec(**d["asha"]) if d.get("asha") else None
        return cls(**d)


# ------------------------------------------------------------------ loading
def _need(ok: bool, where: str, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}: {msg}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _parse_param(where: str, key: str, raw: Any) -> SearchParam:
    k = f"space.{key}"
    example = "e.g. {uniform: [0.1, 1.0]}, {loguniform: [1e-2, 1.0]}, {int: [2, 5]} or {choice: [[8, 14], [10]]}"
    _need(isinstance(raw, Mapping) and len(raw) == 1 and next(iter(raw)) in SPACE_KINDS, where, k,
          f"expected one of {', '.join(SPACE_KINDS)} with its values, {example}; got {raw!r}")
    kind, vals = next(iter(raw.items()))
    if kind == "choice":
        _need(isinstance(vals, list) and len(vals) >= 1, where, k, f"choice needs a non-empty list of values, got {vals!r}")
        encoded = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in vals]
        _need(len(set(map(repr, encoded))) == len(encoded), where, k, f"choice values repeat: {vals!r}")
        return SearchParam(key, kind, choices=tuple(vals))
    _need(isinstance(vals, list) and len(vals) == 2 and all(_is_num(v) for v in vals), where, k,
          f"{kind} needs [low, high] (two numbers), got {vals!r}")
    low, high = vals
    if kind == "int":
        _need(all(isinstance(v, int) for v in vals), where, k, f"int bounds must be integers, got {vals!r}")
        _need(low < high, where, k, f"low {low} must be below high {high}")
        return SearchParam(key, kind, int(low), int(high))
    _need(low < high, where, k, f"low {low} must be below high {high}")
    if kind == "loguniform":
        _need(low > 0, where, k, f"loguniform needs low > 0, got {low}")
    return SearchParam(key, kind, float(low), float(high))


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def read_tune_file(path: str | os.PathLike) -> dict:
    """A tune file's raw mapping (YAML 1.2 numbers: ``far: 1e-3`` is a float)."""
    return read_yaml_mapping(path, "tune file")


def _clamp_refine_choices(prm: SearchParam, epochs: int, where: str,
                          note: Callable[[str], None] | None) -> SearchParam:
    """``compat.refine_epochs`` choices clamped to ``epochs`` as a train config clamps them
    (``clamp_refine_epochs``), choices that became equal merged: the sweep samples what its
    trials will run. Choices that are not lists of integers are left to the validation."""
    def ints(v: Any) -> list[int] | None:
        v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        ok = isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
        return v if ok else None

    if epochs < 2 or any(ints(c) is None for c in prm.choices):
        return prm
    out: list[list[int]] = []
    for c in prm.choices:
        v = list(clamp_refine_epochs(ints(c), epochs))
        if v not in out:
            out.append(v)
    if out == [ints(c) for c in prm.choices]:
        return prm
    if note is not None:
        note(f"{where}: space.{prm.key} {list(prm.choices)} -> {out} (optim.epochs is {epochs}; "
             "a refinement must come before the last epoch)")
    return replace(prm, choices=tuple(out))


def load_tune_spec(path: str | os.PathLike, *, objective: str | None = None,
                   max_concurrent: int | None = None, sets: Sequence[str] = (),
                   note: Callable[[str], None] | None = None) -> TuneSpec:
    """Read and validate a tune file; ``objective``/``max_concurrent`` override the file's,
    ``sets`` (``KEY=VALUE`` like ``train --set``) the base train config after ``overrides``.

    UniBCT refinement epochs past the run's last epoch are clamped as in a train config
    (``unibct_ray.config.clamp_refine_epochs``), in the base config and, when ``optim.epochs``
    is not searched, in the ``compat.refine_epochs`` choices; ``note`` gets a line for each.
    (With ``optim.epochs`` searched, each trial's config is clamped to its own epochs.)"""
    p = Path(path)
    where = p.name
    data = read_tune_file(p)
    unknown = sorted(set(data) - set(_TOP_KEYS))
    _need(not unknown, where, unknown[0] if unknown else "", f"unknown key (valid here: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("base", "validation", "space"):
        _need(key in data, where, key, "required")

    def typed(key: str, tp: type | tuple, default: Any, what: str) -> Any:
        v = data.get(key, default)
        ok = isinstance(v, tp) and not (isinstance(v, bool) and bool not in (tp if isinstance(tp, tuple) else (tp,)))
        _need(ok, where, key, f"expected {what}, got {v!r}")
        return v

    name = typed("name", str, p.stem, "a string")
    _need(bool(name) and "/" not in name and name not in (".", ".."), where, "name", f"must be a plain directory name, got {name!r}")
    storage = typed("storage", str, "runs/tune", "a string")
    base = typed("base", str, "", "a path (relative to the tune file)")
    validation = typed("validation", str, "", "a path to an IJB-C folder")
    overrides = typed("overrides", dict, {}, "a mapping of dotted keys to values")
    far = float(typed("far", (int, float), 1e-3, "a number"))
    _need(any(math.isclose(far, f, rel_tol=1e-9) for f in _FARS), where, "far",
          f"must be one of the report's FARs {', '.join(f'{f:g}' for f in _FARS)}, got {far:g}")
    floor = float(typed("self_new_floor", (int, float), 0.0, "a number"))
    _need(0.0 <= floor <= 1.0, where, "self_new_floor", f"must be a TAR in [0, 1], got {floor}")
    obj = objective or typed("objective", str, "cross", "a string")
    _need(obj in OBJECTIVES, where, "objective", f"must be one of {', '.join(OBJECTIVES)}, got {obj!r}")
    conc = max_concurrent if max_concurrent is not None else typed("max_concurrent", int, 1, "an integer")
    _need(conc >= 1, where, "max_concurrent", f"must be >= 1, got {conc}")
    seed = typed("seed", int, 0, "an integer")
    eval_actors = typed("eval_actors", int, 1, "an integer")
    _need(eval_actors >= 1, where, "eval_actors", f"must be >= 1, got {eval_actors}")

    asha = None
    if data.get("asha") is not None:
        raw = typed("asha", dict, {}, "a mapping {grace_period, reduction_factor}")
        bad = sorted(set(raw) - {"grace_period", "reduction_factor"})
        _need(not bad, where, f"asha.{bad[0]}" if bad else "asha", "unknown key (valid here: grace_period, reduction_factor)")
        gp, rf = raw.get("grace_period", 1), raw.get("reduction_factor", 2.0)
        _need(isinstance(gp, int) and not isinstance(gp, bool) and gp >= 1, where, "asha.grace_period",
              f"expected an integer >= 1 (epochs), got {gp!r}")
        _need(_is_num(rf) and rf > 1, where, "asha.reduction_factor", f"expected a number > 1, got {rf!r}")
        _need(obj == "cross", where, "asha", "early stopping needs a single objective (objective: cross), "
              "not pareto")
        asha = AshaSpec(int(gp), float(rf))

    base_path = (p.parent / base).resolve()
    _need(base_path.is_file(), where, "base", f"train config {base_path} not found")
    cfg = load_config(base_path, note=note)
    sets_cli = sets
    sets = [f"{k}={_json_value(v)}" for k, v in overrides.items()]
    cfg_data = apply_overrides(to_dict(cfg), sets, f"{where}: overrides")
    cfg_data = apply_overrides(cfg_data, list(sets_cli), "--set")
    old = typed("old_checkpoint", str, cfg_data["compat"]["old_checkpoint"], "a path") or ""
    _need(bool(old), where, "old_checkpoint", "required (the old model of the cross test); set it here "
          "or as compat.old_checkpoint in the base config")
    cfg_data["compat"]["old_checkpoint"] = _absolute(old)
    cfg_data["data"]["train"] = _absolute(cfg_data["data"]["train"])
    cfg_data["storage"] = _absolute(cfg_data["storage"])
    base_cfg = from_dict(cfg_data, f"{where}: overrides" + (" and --set" if sets_cli else ""), note=note)
    cfg_data = to_dict(base_cfg)

    space_raw = typed("space", dict, {}, "a mapping of dotted train-config keys to distributions")
    _need(bool(space_raw), where, "space", "needs at least one key to search")
    params = []
    for key, raw in space_raw.items():
        _need(isinstance(key, str), where, "space", f"keys must be dotted strings, got {key!r}")
        _need(key not in _FIXED_KEYS, where, f"space.{key}", "cannot be searched (fixed for the whole sweep: "
              f"{', '.join(_FIXED_KEYS)})")
        prm = _parse_param(where, key, raw)
        if key == "compat.refine_epochs" and prm.kind == "choice" and "optim.epochs" not in space_raw:
            prm = _clamp_refine_choices(prm, base_cfg.optim.epochs, where, note)
        for v in prm.candidates():
            w = f"{where}: space.{key} = {v!r}"
            from_dict(apply_overrides(cfg_data, [f"{key}={_json_value(v)}"], w), w)
        params.append(prm)

    return TuneSpec(source=str(p.resolve()), name=name, storage=_absolute(storage), base=str(base_path),
                    base_config=cfg_data, validation=_absolute(validation), old_checkpoint=_absolute(old),
                    space=tuple(params), far=far, self_new_floor=floor, objective=obj, max_concurrent=conc,
                    seed=seed, eval_actors=eval_actors, asha=asha)


def check_validation(spec: TuneSpec) -> Any:
    """Read the validation IJB-C meta and check it can resolve the FAR -> the ``IJBCMeta``."""
    from unibct_ray.data import ijbc

    meta = ijbc.read_ijbc_meta(Path(spec.validation))
    impostors = int((meta.pair_labels == 0).sum())
    if impostors * spec.far < 1:
        raise ConfigError(f"{spec.where}: far: {impostors} impostor pairs of the validation set {spec.validation} "
                          f"cannot resolve FAR {spec.far:g} (need at least {math.ceil(1 / spec.far)}); render a "
                          "larger validation set or raise far")
    return meta


#: The resolved tune file inside an experiment directory (a resumed experiment keeps its recipe).
SPEC_FILE = "tune-spec.json"
#: Ray Tune's experiment folder inside an experiment directory (one sub-folder per trial).
TRIALS_DIR = "trials"


def _recipe(spec: TuneSpec) -> dict:
    d = spec.to_json()
    for k in ("source", "name", "storage"):
        d.pop(k)
    return json.loads(json.dumps(d))


def open_experiment(spec: TuneSpec | None, num_samples: int | None,
                    resume: str | os.PathLike | None) -> tuple[TuneSpec, int, Path]:
    """(spec, num_samples, experiment dir) of a new sweep or of the one to resume, checked
    before anything starts. A resumed experiment uses its stored ``SPEC_FILE``; a ``spec`` or
    ``num_samples`` given with ``resume`` must match it. A new sweep refuses an existing one.

    A resumed experiment must carry the sweep's signature over its Ray Tune state and recipe
    (``unibct_ray.tune_signature``): checked here, before Ray Tune unpickles any of it."""
    if resume is not None:
        exp_dir = Path(resume).resolve()
        f = exp_dir / SPEC_FILE
        if not f.is_file():
            raise ConfigError(f"{exp_dir}: not a `unibct-ray tune` experiment ({SPEC_FILE} missing)")
        verify_experiment(exp_dir, TRIALS_DIR, extra=(SPEC_FILE,))
        data = json.loads(f.read_text())
        stored, stored_n = TuneSpec.from_json(data["spec"]), int(data["num_samples"])
        if spec is not None and _recipe(spec) != _recipe(stored):
            raise ConfigError(f"{spec.where}: differs from the experiment's {f}; a resumed experiment keeps "
                              "its recipe (drop --config, or start a new experiment)")
        if num_samples is not None and num_samples != stored_n:
            raise ConfigError(f"--num-samples {num_samples}: the experiment in {exp_dir} was started with "
                              f"{stored_n} (a resumed experiment keeps it)")
        return stored, stored_n, exp_dir
    if spec is None or num_samples is None:
        raise ConfigError("give a tune file and --num-samples (or --resume DIR)")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    exp_dir = spec.experiment_dir
    if (exp_dir / SPEC_FILE).exists():
        raise ConfigError(f"{exp_dir}: an experiment already exists (continue it with --resume {exp_dir}, "
                          "or give the tune file another name)")
    return spec, num_samples, exp_dir


# ------------------------------------------------------------------ objective and front
def objective_value(cross: float, self_new: float, floor: float) -> float:
    """The scalar of objective ``cross``: TAR(cross) when TAR(self_new) >= floor, else
    ``(self_new - floor) - 1``, which is below every feasible trial (TARs are in [0, 1]) and
    grows as self_new nears the floor, so the sampler is steered back into the feasible set."""
    return float(cross) if self_new >= floor else float(self_new - floor) - 1.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when maximising both coordinates, by first
    coordinate descending. q dominates p when q >= p in both and q > p in one; equal points
    do not dominate each other (both stay). Points with a NaN are never on the front."""
    ok = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    ok.sort(key=lambda i: (-points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf  # highest y among points with a strictly larger x
    j = 0
    while j < len(ok):
        x = points[ok[j]][0]
        group = [i for i in ok[j:] if points[i][0] == x]
        y_max = points[group[0]][1]
        if y_max > best_y:
            front += [i for i in group if points[i][1] == y_max]
            best_y = y_max
        j += len(group)
    return front


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class TrialRecord:
    """One trial as reported: ``final`` is False while (or when stopped) at an intermediate
    phase-end evaluation, True once the fully trained model was evaluated."""

    trial_id: str
    status: str                      # PENDING | RUNNING | PAUSED | TERMINATED | ERROR
    params: dict = field(default_factory=dict)
    cross: float | None = None
    self_new: float | None = None
    self_old: float | None = None
    objective: float | None = None
    epoch: int | None = None
    final: bool = False
    error: str = ""

    @property
    def complete(self) -> bool:
        """Finished training and evaluated: eligible for best.yaml / the Pareto set."""
        return self.status == "TERMINATED" and self.final and self.cross is not None and self.self_new is not None

    @property
    def state(self) -> str:
        if self.status == "TERMINATED" and not self.final:
            return "STOPPED" if self.cross is not None else "TERMINATED"
        return self.status


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary(spec: TuneSpec) -> str:
    far = f"{spec.far:g}"
    if spec.objective == "cross":
        return (f"maximise TAR@FAR={far} of the cross test (new queries vs the old gallery) subject to "
                f"self_new >= {spec.self_new_floor:g}; a trial below the floor scores (self_new - floor) - 1")
    return f"the Pareto front of TAR@FAR={far}, cross vs self_new (both maximised)"


def _yaml_text(spec: TuneSpec, rec: TrialRecord, name: str) -> str:
    cfg = spec.train_config(rec.params, name=name)
    head = (f"# From `unibct-ray tune` experiment {spec.name}, trial {rec.trial_id}: validation TAR@FAR={spec.far:g} "
            f"cross {_fmt(rec.cross)}, self_new {_fmt(rec.self_new)}, self_old {_fmt(rec.self_old)}.\n"
            f"# Searched: {', '.join(f'{k}={v}' for k, v in rec.params.items())}\n")
    return head + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _plot(spec: TuneSpec, records: Sequence[TrialRecord], front: Sequence[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in records if r.complete]
    on = [r for r in done if r.trial_id in front]
    off = [r for r in done if r.trial_id not in front]
    if off:
        ax.scatter([r.self_new for r in off], [r.cross for r in off], c="0.6", label="trials")
    if on:
        on = sorted(on, key=lambda r: r.self_new)
        ax.plot([r.self_new for r in on], [r.cross for r in on], "o-", c="tab:red", label="Pareto front")
    for r in done:
        ax.annotate(r.trial_id, (r.self_new, r.cross), fontsize=7, xytext=(3, 3), textcoords="offset points")
    olds = [r.self_old for r in done if r.self_old is not None]
    if olds:
        ax.axhline(olds[0], color="tab:blue", ls=":", lw=1, label=f"self_old {olds[0]:.3g}")
    if spec.self_new_floor > 0:
        ax.axvline(spec.self_new_floor, color="0.3", ls="--", lw=1, label=f"self_new floor {spec.self_new_floor:g}")
    ax.set_xlabel(f"self_new TAR@FAR={spec.far:g}")
    ax.set_ylabel(f"cross TAR@FAR={spec.far:g}")
    ax.set_title(f"{spec.name}: validation cross vs self_new")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def write_outputs(spec: TuneSpec, records: Sequence[TrialRecord], out: str | os.PathLike, *,
                  num_samples: int, done: bool, plot: bool = True) -> dict[str, Any]:
    """Write ``trials.json``, ``tune.md``, ``pareto.png`` and, from the complete trials,
    ``best.yaml`` (objective cross) or ``pareto/<trial>.yaml`` (objective pareto) into ``out``.

    The YAMLs are whole train configs (``unibct-ray train --config``) named
    ``<base name>-<trial>`` with the base config's storage. ``plot=False`` keeps the previous
    ``pareto.png`` (it only changes when a trial completes). Returns the summary that
    ``trials.json`` holds.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    complete = [r for r in records if r.complete]
    front_idx = pareto_front([(r.cross, r.self_new) for r in complete])
    front = [complete[i].trial_id for i in front_idx]
    best = None
    feasible = [r for r in complete if r.self_new >= spec.self_new_floor]
    if spec.objective == "cross" and feasible:
        best = max(feasible, key=lambda r: (r.objective, r.self_new)).trial_id
    base_name = spec.base_config["name"]

    pareto_dir = out / "pareto"
    if spec.objective == "pareto":
        pareto_dir.mkdir(exist_ok=True)
        keep = {f"{t}.yaml" for t in front}
        for r in complete:
            if r.trial_id in front:
                atomic_write_text(pareto_dir / f"{r.trial_id}.yaml", _yaml_text(spec, r, f"{base_name}-{r.trial_id}"))
        for stale in pareto_dir.glob("*.yaml"):  # the front moves as trials finish
            if stale.name not in keep:
                stale.unlink()
    elif best is not None:
        rec = next(r for r in complete if r.trial_id == best)
        atomic_write_text(out / "best.yaml", _yaml_text(spec, rec, f"{base_name}-{best}"))

    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = {
        "experiment": spec.name, "objective": spec.objective, "far": spec.far,
        "self_new_floor": spec.self_new_floor, "num_samples": num_samples, "done": done,
        "counts": counts, "best": best, "pareto": front,
        "space": {p.key: p.describe() for p in spec.space},
        "trials": [asdict(r) | {"state": r.state} for r in records],
    }
    atomic_write_text(out / "trials.json", json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n")

    keys = [p.key for p in spec.space]
    lines = [f"# Tune experiment `{spec.name}`", "",
             f"- objective: **{spec.objective}** ({_summary(spec)})",
             f"- base train config: `{spec.base}`; validation (held-out identities): `{spec.validation}`",
             f"- old model: `{spec.old_checkpoint}`",
             f"- search space: " + "; ".join(f"`{p.key}` {p.describe()}" for p in spec.space),
             f"- trials: {len(records)} of {num_samples} started; "
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
             + ("" if done else " (experiment still running)"),
             "", "## Trials", "",
             "| trial | state | " + " | ".join(f"`{k}`" for k in keys) + " | epoch | cross | self_new | self_old |"
             + (" objective |" if spec.objective == "cross" else ""),
             "|---|---|" + "---|" * len(keys) + "---|---|---|---|" + ("---|" if spec.objective == "cross" else "")]
    for r in records:
        mark = " **best**" if r.trial_id == best else (" *front*" if r.trial_id in front else "")
        vals = [_fmt(r.params.get(k)) for k in keys]
        lines.append(f"| {r.trial_id}{mark} | {r.state} | " + " | ".join(vals) +
                     f" | {_fmt(r.epoch)} | {_fmt(r.cross)} | {_fmt(r.self_new)} | {_fmt(r.self_old)} |"
                     + (f" {_fmt(r.objective)} |" if spec.objective == "cross" else ""))
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r.trial_id}: {r.error}" for r in errors]
    lines += [""]
    if spec.objective == "cross":
        lines += ["## Best", ""]
        if best is not None:
            r = next(x for x in complete if x.trial_id == best)
            lines += [f"Trial {best}: cross {_fmt(r.cross)}, self_new {_fmt(r.self_new)}, self_old {_fmt(r.self_old)} "
                      f"at FAR {spec.far:g}. Train config: [`best.yaml`](best.yaml) "
                      f"(`unibct-ray train --config {out / 'best.yaml'}`)."]
        elif complete:
            lines += [f"No complete trial reached self_new >= {spec.self_new_floor:g}; no best.yaml was written."]
        else:
            lines += ["No trial has finished yet."]
    else:
        lines += ["## Pareto front (cross vs self_new)", ""]
        for t in front:
            r = next(x for x in complete if x.trial_id == t)
            lines.append(f"- {t}: cross {_fmt(r.cross)}, self_new {_fmt(r.self_new)} -> [`pareto/{t}.yaml`](pareto/{t}.yaml)"
                         + ("" if r.self_new >= spec.self_new_floor else f" (below the self_new floor {spec.self_new_floor:g})"))
        if not front:
            lines.append("No trial has finished yet.")
    lines += ["", "![cross vs self_new](pareto.png)", ""]
    atomic_write_text(out / "tune.md", "\n".join(lines))
    if plot or not (out / "pareto.png").exists():
        _plot(spec, records, front, out / "pareto.png")
    return summary
