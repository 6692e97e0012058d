"""The main job: a multi-objective Optuna study of per-layer plans under the device budget.

    result = run_study(workload, device, space, settings, sampler=..., tracker=...)  # settings: OptunaSearch

The data path, one owner per step: the profile (profile.py) and the one cost predictor
(cost.PlanCost); the study created or resumed here; the warm-start plans (warmstart.py); each
trial (trial.PlanTrial: choices -> plan -> cost -> constraints -> fine-tune -> record); the front
and records read back from storage (records.py); the plan files (planfile.export_plan).

Resuming: the same storage + study_name continues the study (load_if_exists). `n_trials` counts
the trials the study should hold in total (`n_trials_total=True`, the default: running the same
command again after an interruption finishes the rest, after completion does nothing), or the new
trials of this run (`n_trials_total=False`); warm-start trials count among them. Complete and
infeasible trials count, and failed ones unless they were queued again: an interrupted trial, or
one whose worker died (storage.py's heartbeat), is FAIL with a WAITING copy that the next run (or
another worker) trains (workers.py). Warm-start trials are enqueued with skip_if_exists, so a
resumed study never enqueues them twice; a plan already trained, in an earlier session or by
another worker, is reused, not trained again. Many workers may run the same command at once on
one storage (PostgreSQL, or SQLite on one machine): together they finish exactly n_trials.

SIGINT/SIGTERM (autorank.interrupt.Interrupted, raised inside the app's stop_on_signals block):
the running trial is failed and queued again, the tracker's runs are ended KILLED, and the
exception goes on to the app.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.progress import Progress, TaskID

from autorank.interrupt import Interrupted
from autorank.search.cost import CostModel, PlanCost
from autorank.search.knapsack import check_budget
from autorank.search.planfile import export_plan, export_record
from autorank.search.profile import Profile, profile_workload
from autorank.search.progress import progress_bar
from autorank.search.protocols import Device, Tracker, Workload, device_summary
from autorank.search.budget import is_exact, is_plain
from autorank.search.result import SearchResult
from autorank.search.records import (DIRECTIONS, OBJECTIVE_NAMES, TrialRecord, best_of, best_refit,
                                     front_of, records_from_study)
from autorank.search.refit import refit_phase
from autorank.search.space import SearchSpace, load_space
from autorank.io import sqlite_path
from autorank.search.storage import HEARTBEAT_S, check_driver, open_storage
from autorank.search.trial import PlanTrial, TimeSplit, start_param
from autorank.search.warmstart import warm_start_plans
from autorank.search.workers import SURPLUS_ATTR, Census, GuardedObjective, close_interrupted, run_trials


@dataclass(frozen=True, kw_only=True)
class OptunaSearch:
    """The study's settings and the object that runs it: conf/search/optuna.yaml, instantiated by
    Hydra (`_target_`), every field from there (the YAML holds the defaults, the one place). The
    YAML's comments say what each field means; run_dir, export_path and cache_dir come from the
    app's paths and export groups."""

    name: str
    space: Any  # a space name, a file, or the `space` group's mapping (search.space.load_space)
    n_trials: int
    n_trials_total: bool
    timeout: float | None
    storage: str | None  # any Optuna storage URL; None: sqlite:///<run_dir>/optuna.db
    study_name: str | None
    max_epochs: int | None
    trial_steps: int | None
    refit_steps: int | None
    refit_top: int
    references: bool
    warm_start: bool
    n_calibration_batches: int
    heartbeat_s: int | None
    run_dir: str | Path
    export_path: str | Path | None
    cache_dir: str | Path | None
    progress: bool

    def __post_init__(self) -> None:
        if self.storage:  # before pretraining: a PostgreSQL URL without its driver
            check_driver(self.storage)

    def run(self, workload: Workload, device: Device, *,
            sampler: optuna.samplers.BaseSampler | None = None, tracker: Tracker | None = None,
            config: Mapping[str, Any] | None = None) -> SearchResult:
        return run_study(workload, device, load_space(self.space), self, sampler=sampler,
                         tracker=tracker, config=config)

    def storage_url(self) -> str:
        """The storage URL; a SQLite file's folder is created."""
        if self.storage is None:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{(Path(self.run_dir) / 'optuna.db').resolve()}"
        path = sqlite_path(self.storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return self.storage


def default_study_name(device_name: str, space: SearchSpace, key: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"space": space.sha256, **key}, sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
    return f"autorank-{device_name}-{space.name}-{h}"


def open_study(storage: str, study_name: str, sampler: optuna.samplers.BaseSampler | None, *,
               heartbeat_s: int | None = HEARTBEAT_S) -> tuple[optuna.Study, list[TrialRecord]]:
    """Create the study or load it (resume); returns it with its finished trials."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage, heartbeat_s=heartbeat_s),
                                sampler=sampler, directions=list(DIRECTIONS), load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVE_NAMES))
    finished = [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)
                if t.state.is_finished()]
    if finished:
        study.sampler.reseed_rng()  # a resumed seeded sampler would replay its first samples
    return study, finished


def enqueue_warm_starts(study: optuna.Study, plans: list[tuple[str, dict]], hparams: Mapping[str, float],
                        n_new: int) -> None:
    """The first plans of `plans`, at most half of this run's trials (the sampler gets the rest,
    and no enqueued trial is left WAITING at the end), each once per study (skip_if_exists; two
    workers enqueuing one at the same moment: workers.py runs the first copy only)."""
    for src, ch in plans[:max(1, n_new // 2)]:  # a plan's own hparams (an lr probe) over the warm-start values
        study.enqueue_trial({**hparams, **ch}, user_attrs={"source": src}, skip_if_exists=True)


class TrialLogger:
    """Optuna callback after each trial: the tracker's nested run, and the progress bar with the
    best feasible accuracy and the front's size (study.best_trials, re-read when a feasible
    trial arrives: only then can the front change)."""

    def __init__(self, study: optuna.Study, bar: Progress, task: TaskID, tracker: Tracker | None,
                 times: TimeSplit):
        self.bar, self.task, self.tracker, self.times = bar, task, tracker, times
        self.front = self.read_front(study)

    @staticmethod
    def read_front(study: optuna.Study) -> list[TrialRecord]:
        return [TrialRecord.from_frozen(t, on_front=True) for t in study.best_trials]

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        with self.times.timed("log"):
            if SURPLUS_ATTR in frozen.user_attrs:  # closed unrun (workers.py): nothing to log
                return
            rec = TrialRecord.from_frozen(frozen)
            if rec.feasible:
                self.front = self.read_front(study)
            if self.tracker is not None:
                self.tracker.log_trial(rec)
            best = best_of(self.front)
            self.bar.update(self.task, advance=1, description=(
                f"trials | best feasible acc {best.val_accuracy:.3f}" if best else
                "trials | no feasible trial yet") + f" | front {len(self.front)}")


def run_study(workload: Workload, device: Device, space: SearchSpace,
              settings: OptunaSearch, *,
              sampler: optuna.samplers.BaseSampler | None = None, tracker: Tracker | None = None,
              config: Mapping[str, Any] | None = None, profile: Profile | None = None,
              cost: CostModel | None = None) -> SearchResult:
    """Search per-layer plans of `workload` under `device.budget_bytes` (see module doc).

    profile, cost: computed from the workload when None (tests pass their own). config: the
    app's whole configuration, for the tracker. Returns the SearchResult; the best feasible plan is
    written to settings.export_path when given.
    """
    t_start = time.perf_counter()
    times = TimeSplit()
    if profile is None:
        with times.timed("profile"):
            profile = profile_workload(workload, space, n_batches=settings.n_calibration_batches,
                                       cache_dir=settings.cache_dir, progress=settings.progress)
    cost = cost or PlanCost(workload.model, workload.example_input(), profile, loss=workload.loss)
    budget = int(device.budget_bytes)
    check_budget(profile, budget, cost.peak)  # BudgetTooSmall before any trial or stored study
    storage = settings.storage_url()
    name = settings.study_name or default_study_name(device.name, space, {
        "ckpt": workload.checkpoint_sha256, "input_shape": list(workload.input_shape),
        "budget": budget})
    study, finished = open_study(storage, name, sampler, heartbeat_s=settings.heartbeat_s)
    counted = Census.of(study.get_trials(deepcopy=False)).counted
    target = settings.n_trials if settings.n_trials_total else counted + int(settings.n_trials)
    n_new = max(0, target - counted)
    hp0 = space.hparam_defaults(workload.finetune_settings().to_dict())  # warm starts: the trainer's
    plan_meta = {"budget_bytes": budget, "device": device.name, "study": name}
    objective = GuardedObjective(PlanTrial(workload, device, profile, cost, plan_meta=plan_meta,
                                           max_epochs=settings.max_epochs, times=times, done=finished,
                                           hparams=space.hparams, trial_steps=settings.trial_steps), target)
    try:
        if tracker is not None:
            with times.timed("log"):
                tracker.start_study({
                    "config": dict(config or {}), "device": device_summary(device), "budget_bytes": budget,
                    "space": space.to_dict(), "sampler": type(study.sampler).__name__, "storage": storage,
                    "study_name": name, "n_trials": settings.n_trials, "timeout": settings.timeout,
                    "profile_key": profile.key, "heartbeat_s": settings.heartbeat_s})
        if settings.warm_start and n_new > 0:
            with times.timed("predict"):
                plans = [(src, {**ch, **start_param(profile, ch)})
                         for src, ch in warm_start_plans(profile, budget, cost, space.hparam_probe(hp0))]
                enqueue_warm_starts(study, plans, hp0, n_new)
        with progress_bar(settings.progress) as bar:
            logger = TrialLogger(study, bar, bar.add_task("trials", total=n_new), tracker, times)
            run_trials(study, objective, timeout=settings.timeout, callbacks=[logger],
                       heartbeat_s=settings.heartbeat_s)
        refs = {}
        if settings.refit_steps:
            with times.timed("train"):
                refs = refit_phase(study, workload, records_from_study(study), profile, cost,
                                   steps=settings.refit_steps, top=settings.refit_top,
                                   references=settings.references, budget_bytes=budget, hparams=hp0,
                                   plan_meta=plan_meta, progress=settings.progress)
        with times.timed("log"):
            result = write_plans(study, workload, settings, storage, budget, device)
        result.references = refs
        with times.timed("log"):
            result.reference_files = write_reference_plans(workload, profile, cost, device, refs, result,
                                                           settings.run_dir, plan_meta)
        result.n_new, result.time_split_s = n_new, times.as_dict()
        result.wall_s = time.perf_counter() - t_start
        if tracker is not None:
            with times.timed("log"):
                tracker.end_study(result, result.plan_files)
    except Interrupted as e:
        closed = close_interrupted(study, objective.started)
        if e.trial is None and closed:  # the signal came inside Optuna's part of the trial
            e.trial = closed[-1].number
        if tracker is not None:
            tracker.abort_study([TrialRecord.from_frozen(t) for t in closed])
        raise
    return result


def write_reference_plans(workload: Workload, profile: Profile, cost: CostModel, device: Device,
                          refs: Mapping[str, Mapping], result: SearchResult, run_dir: str | Path,
                          plan_meta: Mapping[str, Any]) -> dict[str, Path]:
    """Plan files of the points a user compares the exported plan with on the device: the best
    plain-only plan that fits and the refit references (plain reference, head alone), under
    <run_dir>/references/, each with its predicted tensor and process peaks."""
    folder = Path(run_dir) / "references"
    out: dict[str, Path] = {}
    points = {name: ref["choices"] for name, ref in refs.items()}
    if result.best_plain is not None:
        points["best plain"] = result.best_plain.choices
    for name, choices in points.items():
        plan = profile.to_plan(choices, meta=dict(plan_meta))
        peak = cost.peak(choices)
        meta = {"reference": name, "predicted_peak_bytes": int(peak.total_bytes),
                "predicted_activation_bytes": int(peak.activation_bytes),
                "process_peak_bytes": int(device.process_peak(peak.total_bytes).total_bytes),
                "finetune": workload.finetune_settings().to_dict()}
        out[name] = export_plan(plan, folder / f"{name.replace(' ', '_')}.yaml", workload.model, meta=meta)
    return out


def write_plans(study: optuna.Study, workload: Workload, settings: OptunaSearch, storage: str,
                budget: int, device: Device) -> SearchResult:
    """Read the trials and the front back from storage; write every front plan under
    <run_dir>/front/ and the best one to settings.export_path: the best refit plan when plans
    were refit (its plan file then records the refit's steps), else the best proxy one. Each
    file is planfile.export_record's, as `python -m autorank.export` writes it."""
    trials = records_from_study(study)
    front = front_of(trials)
    refit = settings.refit_steps and best_refit(trials)
    best = refit or best_of(front)

    def best_where(keep: Callable[[Mapping[str, str]], bool]) -> TrialRecord | None:  # by refit, else proxy
        some = [r for r in trials if r.feasible and keep(r.choices)]
        return (best_refit(some) if refit else None) or best_of(some)

    best_plain = best_where(is_plain)
    best_exact = best_where(lambda ch: is_exact(ch) and not is_plain(ch))

    def write(r: TrialRecord, path: str | Path) -> Path:
        # the whole training process on the device: runtime + tensors (autorank.cost.process)
        process = int(device.process_peak(r.predicted_peak_bytes).total_bytes)
        return export_record(r, path, workload.model, meta={"process_peak_bytes": process})

    plan_files = {r.number: write(r, Path(settings.run_dir) / "front" / f"trial_{r.number:04d}.yaml")
                  for r in front}
    out = None
    if best is not None and settings.export_path is not None:
        out = write(best, settings.export_path)
    return SearchResult(search=settings.name, study_name=study.study_name, storage=storage, budget_bytes=budget,
                        trials=trials, front=front, best=best, loss=workload.loss, export_path=out,
                        plan_files=plan_files, study=study, best_plain=best_plain, best_exact=best_exact,
                        refit_steps=settings.refit_steps, val_count=workload.val_count)
