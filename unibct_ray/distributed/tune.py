"""``unibct-ray tune``: Ray Tune + Optuna over train-config keys, each trial trained on Ray Train
and evaluated on held-out identities.

A trial is a Tune *function trainable* that asks for no CPU itself: it calls ``train()`` (whose
``TorchTrainer`` workers, extraction and refinement actors request their own resources), then
evaluates the final checkpoint against the old model on the validation IJB-C folder
(bootstrap off) and reports TAR at the sweep's FAR for cross, self_new and self_old. Objective
``cross`` maximises one number (:func:`unibct_ray.tuning.objective_value`); objective
``pareto`` gives Optuna two (cross, self_new) and the front is computed from the results.

Experiment directory ``DIR = storage/name``::

    DIR/tune-spec.json       the resolved tune file (a resumed experiment keeps its recipe)
    DIR/trials/<trial>/      everything of one trial: its training run (checkpoints,
                             metrics.csv, final.pt), val/ (its validation reports),
                             final_result.json, attempts.log, and Ray Tune's log of the
                             trial (params.json, progress.csv, result.json, error.txt)
    DIR/trials/experiment_state-*.json, tuner.pkl, ...   Ray Tune's experiment state
    DIR/tune-signature.json  the sweep's HMAC over Ray Tune's state and the recipe: ``--resume``
                             restores nothing that does not verify (``unibct_ray.tune_signature``)
    DIR/cache/               validation features by checkpoint hash (the old model's once)
    DIR/tune.md, trials.json, best.yaml | pareto/<trial>.yaml, pareto.png

Ray Tune's experiment is ``DIR/trials`` with one folder per trial named by its id, so a trial
has one home. (Tune also copies every top-level ``.json`` of its experiment folder to a
staging folder when it restores and uploads them back later: the sweep's own outputs stay
out of it.)

The outputs are rewritten whenever a trial changes state, so ``tune.md`` shows a running sweep.
``--resume DIR`` restores Tune's state: finished trials keep their results, unfinished and
errored ones run again and continue from their own last training checkpoint. A trial whose
``final_result.json`` exists (it finished, but the driver died before Tune saved that) reports the
stored result without training again.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import tune

from unibct_ray.config import TrainConfig
from unibct_ray.distributed.train import OLD_FEATURES_DIR, MetricsTail, epoch_line
from unibct_ray.data.shards import atomic_write_text
from unibct_ray.errors import UserError
from unibct_ray.tune_signature import load_key, sign_files, tune_state_files
from unibct_ray.tuning import (SPEC_FILE, TRIALS_DIR, TrialRecord, TuneSpec, check_validation, objective_value,
                               write_outputs)

__all__ = ["run_tune", "run_trial", "check_tune_plan", "TuneOutputs", "TrialProgress", "SignTuneState",
           "TRIALS_DIR"]

CACHE_DIR = "cache"
TUNER_FILE = "tuner.pkl"  # Ray Tune's pickled Tuner (``ray.tune.impl.tuner_internal._TUNER_PKL``)
RESULT_FILE = "final_result.json"  # not result.json: Ray Tune writes its own log there
ATTEMPTS_FILE = "attempts.log"
TRIAL_CPU = 0.01


def _log_attempt(run_dir: Path, what: str) -> None:
    with open(run_dir / ATTEMPTS_FILE, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()} {what}\n")


def _evaluate(spec: TuneSpec, exp_dir: Path, out: Path, checkpoint: Path, epoch: int, final: bool) -> dict:
    """Validation TARs of ``checkpoint`` against the old model -> the metrics a trial reports."""
    from unibct_ray.distributed.evaluate import EvalArgs, run_eval
    from unibct_ray.metrics.verification import rate_key

    (out / "report.json").unlink(missing_ok=True)  # a trial run again after a driver restart
    rep = run_eval(EvalArgs(ijbc=Path(spec.validation), out=out, old_checkpoint=Path(spec.old_checkpoint),
                            new_checkpoint=Path(checkpoint), criterion_far=spec.far, bootstrap=0, shards=1,
                            actors=spec.eval_actors, cache_dir=exp_dir / CACHE_DIR))
    key = rate_key(spec.far)
    tar = {t: rep["verification"][t].get(key) for t in ("cross", "self_new", "self_old")}
    bad = [t for t, v in tar.items() if v is None or not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"{spec.validation}: TAR at FAR {key} is undefined for {', '.join(bad)}")
    return {**tar, "objective": objective_value(tar["cross"], tar["self_new"], spec.self_new_floor),
            "epoch": int(epoch), "final": bool(final)}


def _shared_old_features(cfg: TrainConfig, spec: TuneSpec) -> TrainConfig:
    """Every trial reads one copy of the old model's features of the training set (the sweep
    cannot change the data or the old model): the base config's, under its storage
    (``STORAGE/old_features/<key>``, shared with the training runs of that base config) unless
    it names its own cache. A trial's own storage is inside the experiment."""
    if cfg.compat.old_features_cache:
        return cfg
    root = Path(spec.base_config["storage"]) / OLD_FEATURES_DIR
    return replace(cfg, compat=replace(cfg.compat, old_features_cache=str(root)))


def run_trial(config: dict, spec: dict | None = None, exp_dir: str | None = None) -> None:
    """The Tune trainable: train the sampled config, evaluate on the validation set, report."""
    from unibct_ray.checkpoint import find_latest_checkpoint
    from unibct_ray.distributed.train import train

    s = TuneSpec.from_json(spec)
    exp = Path(exp_dir)
    trial_id = tune.get_context().get_trial_id()
    run_dir = exp / TRIALS_DIR / trial_id
    cfg = _shared_old_features(s.train_config(s.decode(config), name=trial_id, storage=str(exp / TRIALS_DIR)), s)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / RESULT_FILE
    if done.exists():
        _log_attempt(run_dir, "cached result")
        tune.report(json.loads(done.read_text()))
        return
    resume = run_dir if find_latest_checkpoint(run_dir) is not None else None
    _log_attempt(run_dir, "resume training" if resume else "train")

    on_phase_end = None
    if s.asha is not None:  # ASHA's rungs: an evaluation at each phase end (refinement epoch)
        def on_phase_end(checkpoint: Path, epoch: int) -> None:
            if epoch < cfg.optim.epochs:
                tune.report(_evaluate(s, exp, run_dir / "val" / f"epoch-{epoch:03d}", checkpoint, epoch, False))

    res = train(cfg, resume=resume, on_phase_end=on_phase_end)
    metrics = _evaluate(s, exp, run_dir / "val" / "final", res.checkpoint, cfg.optim.epochs, True)
    atomic_write_text(done, json.dumps(metrics) + "\n")
    tune.report(metrics)


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is the trial's run directory, ``DIR/trials/<id>``."""
    return trial.trial_id


def _error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return "failed (no error file)" if trial.status == "ERROR" else ""
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed")[:300]


class TuneOutputs(tune.Callback):
    """Rewrites the experiment's outputs whenever a trial changes state or reports.

    The files can be ahead of Tune's saved experiment state (Tune saves it every 10 s or more):
    a trial they show finished may come back unfinished after a driver restart. Tune then
    starts it again and it reports its stored ``final_result.json`` without training (``run_trial``).
    """

    def __init__(self, spec: dict, exp_dir: str, num_samples: int):
        self.spec, self.exp_dir, self.num_samples = spec, exp_dir, num_samples
        self._last = ""
        self._plotted: list[str] | None = None

    def _spec(self) -> TuneSpec:
        if getattr(self, "_parsed", None) is None:
            self._parsed = TuneSpec.from_json(self.spec)
        return self._parsed

    def _records(self, trials: list) -> list[TrialRecord]:
        s = self._spec()
        out = []
        for t in trials:
            r = t.last_result or {}
            try:
                params = s.decode(t.config)
            except (KeyError, ValueError):
                params = dict(t.config)
            out.append(TrialRecord(
                trial_id=t.trial_id, status=t.status, params=params,
                cross=r.get("cross"), self_new=r.get("self_new"), self_old=r.get("self_old"),
                objective=r.get("objective"), epoch=r.get("epoch"), final=bool(r.get("final", False)),
                error=_error_line(t) if t.status == "ERROR" else ""))
        return out

    def _write(self, trials: list, done: bool) -> None:
        recs = self._records(trials)
        key = json.dumps([[r.trial_id, r.status, r.epoch, r.cross, r.self_new, r.error] for r in recs] + [done])
        if key == self._last:
            return
        before = {x[0]: x[1] for x in json.loads(self._last)[:-1]} if self._last else {}
        self._last = key
        complete = sorted(r.trial_id for r in recs if r.complete)
        write_outputs(self._spec(), recs, self.exp_dir, num_samples=self.num_samples, done=done,
                      plot=complete != self._plotted or done)
        self._plotted = complete
        for r in recs:
            if before.get(r.trial_id) != r.status and r.status in ("TERMINATED", "ERROR"):
                what = (f"cross {r.cross:.4f}  self_new {r.self_new:.4f}  self_old {r.self_old:.4f}"
                        if r.cross is not None else r.error)
                print(f"[tune] trial {r.trial_id} {r.state.lower()}: {r.params}  {what}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._write(trials, done=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write(trials, done=True)


class TrialProgress(tune.Callback):
    """Prints, on the driver, each running trial's epochs and the validation TARs it reports
    at the ASHA rungs (its final TARs are the ``TuneOutputs`` line when it ends).

    A trial's own output does not reach the quiet driver, and Tune hears from a trial only when
    it reports; the epochs are read from the trial's ``metrics.csv`` (shared storage, as for
    ``train``'s own progress lines), every 2 s while trials run.
    """

    POLL_S = 2.0

    def __init__(self, spec: dict, exp_dir: str):
        self.spec, self.exp_dir = spec, exp_dir
        self._tails: dict[str, tuple[MetricsTail, int]] = {}
        self._polled = 0.0

    def _epochs(self, trial: Any) -> int:
        s = TuneSpec.from_json(self.spec)
        try:
            return int(s.decode(trial.config).get("optim.epochs", s.base_config["optim"]["epochs"]))
        except (KeyError, ValueError):
            return int(s.base_config["optim"]["epochs"])

    def _flush(self, trial_id: str) -> None:
        tail, epochs = self._tails[trial_id]
        for r in tail.new_rows():
            print(f"[tune] trial {trial_id} {epoch_line(r, epochs)}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = Path(self.exp_dir) / TRIALS_DIR / trial.trial_id / "metrics.csv"
        self._tails[trial.trial_id] = (MetricsTail(path), self._epochs(trial))
        print(f"[tune] trial {trial.trial_id} started: {TuneSpec.from_json(self.spec).decode(trial.config)}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._polled < self.POLL_S:
            return
        self._polled = time.monotonic()
        for trial_id in list(self._tails):
            self._flush(trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self._tails:
            self._flush(trial.trial_id)
        if result.get("final", True) or result.get("cross") is None:
            return
        far = TuneSpec.from_json(self.spec).far
        print(f"[tune] trial {trial.trial_id} rung at epoch {result.get('epoch')}: TAR@FAR={far:g} cross "
              f"{result['cross']:.4f}  self_new {result['self_new']:.4f}  self_old {result['self_old']:.4f}", flush=True)

    def _end(self, trial: Any) -> None:
        if trial.trial_id in self._tails:
            self._flush(trial.trial_id)
            del self._tails[trial.trial_id]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)


class SignTuneState(tune.Callback):
    """Signs Ray Tune's experiment state each time Tune saves it, before Tune uploads it.

    Tune saves its state into a local staging folder (``trial.local_experiment_path``) and then
    copies that folder to ``DIR/trials`` in a background thread. The callbacks' ``get_state`` is
    the last step of each save, after the experiment state and the searcher's files are written
    and before the upload starts: the digests of the staged files are signed there, so the
    signature on ``DIR`` always covers what reaches ``DIR``. Tune's first save can come before a
    callback has seen a trial (the staging folder is unknown then): it is signed at the end of
    that same step. Holds no key (Tune pickles its callbacks into ``tuner.pkl``).
    """

    def __init__(self, exp_dir: str):
        self.exp_dir = exp_dir
        self._staging: str | None = None
        self._unsigned_save = False

    def _sign(self) -> None:
        sign_files(self.exp_dir, {f"{TRIALS_DIR}/{rel}": p for rel, p in tune_state_files(self._staging).items()})
        self._unsigned_save = False

    def _learn(self, trials: list) -> None:
        if self._staging is None and trials:
            self._staging = trials[0].local_experiment_path

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._learn(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._learn(trials)
        if self._unsigned_save and self._staging is not None:
            self._sign()

    def get_state(self) -> None:
        if self._staging is None:
            self._unsigned_save = True
        else:
            self._sign()
        return None  # nothing to restore: no callback-states pickle is written for it


def _prepare(spec: TuneSpec, exp_dir: Path) -> None:
    """Check the validation set and extract what every trial shares, once, before any trial."""
    from unibct_ray.distributed.evaluate import checkpoint_features

    meta = check_validation(spec)
    print(f"[tune] validation set: {len(meta.image_names)} images, {len(meta.pair_labels)} pairs; "
          "old-model features", flush=True)
    checkpoint_features(meta, Path(spec.old_checkpoint), exp_dir / CACHE_DIR, spec.eval_actors)
    methods = {spec.base_config["compat"]["method"]}
    if any(p.key == "compat.method" for p in spec.space):
        methods |= set(spec.param("compat.method").choices)
    if methods != {"independent"}:
        # Extracted here, once: trials running at the same time must not race to write it.
        from unibct_ray.distributed.data import OLD_FEATURE_COLUMN
        from unibct_ray.distributed.extract import extract_features
        from unibct_ray.distributed.train import _reuse_if_raced, old_features_dir

        cfg = _shared_old_features(spec.train_config({}, name="old-features"), spec)
        out = old_features_dir(cfg, cfg.data.train)
        if not (out / "manifest.json").exists():
            print(f"[tune] old-model features of {cfg.data.train} ({cfg.extract_actors} actors) -> {out}", flush=True)
            from unibct_ray.resources import extract_actor_resources

            res = extract_actor_resources(cfg)
            with _reuse_if_raced(out):
                extract_features(cfg.data.train, out, checkpoint=Path(cfg.compat.old_checkpoint),
                                 column=OLD_FEATURE_COLUMN, keep_images=True, actors=cfg.extract_actors,
                                 batch_size=cfg.extract_batch, cpus_per_actor=res["CPU"],
                                 gpus_per_actor=res.get("GPU", 0.0))


def check_tune_plan(spec: TuneSpec) -> None:
    """Refuse a sweep whose ``max_concurrent`` trials the cluster cannot hold at once (the base
    config's resources; the search space changes compat keys, not the worker group)."""
    from unibct_ray.distributed.plan import check_cluster

    check_cluster(spec.train_config({}, name=spec.name), trials=spec.max_concurrent)


def _searcher_and_scheduler(spec: TuneSpec) -> tuple[Any, Any, dict]:
    from ray.tune.search.optuna import OptunaSearch

    if spec.objective == "cross":
        metric, mode = "objective", "max"
        tune_kw = {"metric": metric, "mode": mode}
    else:
        metric, mode = ["cross", "self_new"], ["max", "max"]
        tune_kw = {}  # a metric list is the searcher's alone (TuneConfig takes one metric)
    search = OptunaSearch(space=spec.optuna_space(), metric=metric, mode=mode, seed=spec.seed)
    scheduler = None
    if spec.asha is not None:
        from ray.tune.schedulers import ASHAScheduler

        epochs = spec.base_config["optim"]["epochs"]
        if any(p.key == "optim.epochs" for p in spec.space):
            epochs = max(int(v) for v in spec.param("optim.epochs").candidates())
        scheduler = ASHAScheduler(time_attr="epoch", grace_period=spec.asha.grace_period,
                                  reduction_factor=spec.asha.reduction_factor, max_t=epochs)
    return search, scheduler, tune_kw


def run_tune(spec: TuneSpec, num_samples: int, exp_dir: str | os.PathLike, *, resume: bool = False) -> dict:
    """Run the sweep ``open_experiment`` planned (or resume it) on the connected Ray; returns
    the summary that ``DIR/trials.json`` holds."""
    exp_dir = Path(exp_dir)
    state_dir = exp_dir / TRIALS_DIR  # Ray Tune's experiment (see the module docstring)
    if resume and not tune.Tuner.can_restore(str(state_dir)):
        raise UserError(f"{exp_dir}: no Ray Tune state to resume from (the experiment never started a trial)")
    load_key(create=True)  # a missing or unsafe key stops the sweep here, not at Tune's first save
    exp_dir.mkdir(parents=True, exist_ok=True)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    check_tune_plan(spec)  # before any extraction or trial: a sweep that cannot run fails here
    _prepare(spec, exp_dir)
    if not resume:
        atomic_write_text(exp_dir / SPEC_FILE, json.dumps({"num_samples": num_samples, "spec": spec.to_json()},
                                                          indent=2) + "\n")

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.to_json(), exp_dir=str(exp_dir)),
        # The trial only drives: its Train workers and actors request their own CPUs. (A bundle
        # of 0 CPU is refused by Tune, and a whole CPU would idle while the workers wait for it.)
        {"cpu": TRIAL_CPU})
    if resume:
        print(f"[tune] resuming {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(state_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        search, scheduler, tune_kw = _searcher_and_scheduler(spec)
        print(f"[tune] {num_samples} trials of {spec.base_config['name']} ({spec.objective}), at most "
              f"{spec.max_concurrent} at a time -> {exp_dir}", flush=True)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=spec.max_concurrent,
                                        trial_dirname_creator=_trial_dirname, **tune_kw),
            run_config=tune.RunConfig(name=TRIALS_DIR, storage_path=str(exp_dir), verbose=0,
                                      callbacks=[TuneOutputs(spec.to_json(), str(exp_dir), num_samples),
                                                 TrialProgress(spec.to_json(), str(exp_dir)),
                                                 SignTuneState(str(exp_dir))],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        # Tuner() wrote tuner.pkl straight to DIR/trials (not through the staging folder)
        sign_files(exp_dir, {SPEC_FILE: exp_dir / SPEC_FILE, f"{TRIALS_DIR}/{TUNER_FILE}": state_dir / TUNER_FILE})
    tuner.fit()
    return json.loads((exp_dir / "trials.json").read_text())
