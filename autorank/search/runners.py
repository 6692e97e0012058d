"""What the `search` config group builds (conf/search/*.yaml): a settings object whose `run`
the app calls with the objects it has built (workload, device, sampler, tracker)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autorank.search.knapsack import KnapsackResult, knapsack
from autorank.search.profile import Profile, profile_workload
from autorank.search.space import SearchSpace, load_space
from autorank.search.study import MB, StudyResult, WorkloadCost, default_plan_meta, run_study


@dataclass
class KnapsackRun:
    knapsack: KnapsackResult
    plan: Any  # Plan
    profile: Profile
    val_accuracy: float
    predicted_peak_bytes: int
    predicted_activation_bytes: int | None
    measured_activation_bytes: int | None
    train_flops: int
    step_time_s: float
    export_path: Path | None
    run_id: str | None
    wall_s: float


def run_knapsack(workload, device, space: SearchSpace | str, *, tracker=None,
                 config: Mapping[str, Any] | None = None, export_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, n_calibration_batches: int = 2,
                 max_epochs: int | None = None, progress: bool = True) -> KnapsackRun:
    """The paper's planner end to end: profile (cached) -> knapsack under device.budget_bytes ->
    fine-tune the plan -> accuracy, predicted/measured memory, FLOPs, step time -> MLflow, export.
    Raises BudgetTooSmall (its message names the minimum in MB) when nothing fits."""
    t0 = time.perf_counter()
    space = load_space(space)
    prof = profile_workload(workload, space, n_batches=n_calibration_batches, cache_dir=cache_dir,
                            progress=progress)
    cost = WorkloadCost(workload.model, workload.example_input(), prof)
    res = knapsack(prof, device.budget_bytes, cost.peak)
    pm = cost.peak(res.choices)
    flops = cost.flops(res.choices)
    plan = prof.to_plan(res.choices, meta={
        "source": "knapsack", "budget_bytes": int(device.budget_bytes), "device": device.name,
        "input_shape": list(workload.input_shape), "predicted_peak_bytes": res.predicted_peak_bytes,
        "predicted_activation_bytes": getattr(pm, "activation_bytes", None), "train_flops": flops,
        "sensitivity": res.sensitivity, **default_plan_meta(workload)})
    res.plan = plan
    ft = workload.finetune(plan, max_epochs=max_epochs, progress=progress)
    out = plan.save(export_path, model=workload.model) if export_path is not None else None
    run = KnapsackRun(knapsack=res, plan=plan, profile=prof, val_accuracy=float(ft.val_accuracy),
                      predicted_peak_bytes=res.predicted_peak_bytes,
                      predicted_activation_bytes=getattr(pm, "activation_bytes", None),
                      measured_activation_bytes=ft.measured_activation_bytes, train_flops=int(flops),
                      step_time_s=float(device.step_time_s(flops)), export_path=out, run_id=None,
                      wall_s=time.perf_counter() - t0)
    if tracker is not None:
        from autorank.search.study import _device_dict

        run.run_id = tracker.log_single_run(
            {"kind": "knapsack", "config": dict(config or {}), "device": _device_dict(device),
             "budget_bytes": int(device.budget_bytes), "space": space.to_dict()},
            res.choices,
            {"val_accuracy": run.val_accuracy, "predicted_peak_mb": res.predicted_peak_bytes / MB,
             "predicted_peak_bytes": res.predicted_peak_bytes,
             "predicted_activation_bytes": run.predicted_activation_bytes,
             "measured_activation_bytes": run.measured_activation_bytes, "train_flops": flops,
             "predicted_step_time_s": run.step_time_s, "sensitivity": res.sensitivity,
             "min_peak_mb": res.min_peak_bytes / MB, "wall_s": run.wall_s},
            {"plan": out} if out is not None else {})
    return run


@dataclass
class KnapsackSearch:
    """conf/search/knapsack.yaml."""

    space: str = "default"
    n_calibration_batches: int = 2
    max_epochs: int | None = None
    name: str = "knapsack"

    def run(self, workload, device, *, sampler=None, tracker=None, config=None, run_dir=".",
            export_path=None, cache_dir=None, progress: bool = True) -> KnapsackRun:
        return run_knapsack(workload, device, self.space, tracker=tracker, config=config,
                            export_path=export_path, cache_dir=cache_dir,
                            n_calibration_batches=self.n_calibration_batches,
                            max_epochs=self.max_epochs, progress=progress)


@dataclass
class OptunaSearch:
    """conf/search/optuna.yaml. n_trials counts the study's finished trials in total
    (n_trials_total=true; running the same command again finishes an interrupted study and adds
    nothing to a finished one) or this run's new trials (n_trials_total=false)."""

    space: str = "default"
    n_trials: int = 24
    n_trials_total: bool = True
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    max_epochs: int | None = None
    warm_start: bool = True
    n_calibration_batches: int = 2
    name: str = "optuna"

    def run(self, workload, device, *, sampler=None, tracker=None, config=None, run_dir=".",
            export_path=None, cache_dir=None, progress: bool = True) -> StudyResult:
        return run_study(workload, device, load_space(self.space), sampler=sampler,
                         storage=self.storage, study_name=self.study_name, n_trials=self.n_trials,
                         n_trials_total=self.n_trials_total, timeout=self.timeout, tracker=tracker,
                         config=config, run_dir=run_dir, export_path=export_path,
                         cache_dir=cache_dir, max_epochs=self.max_epochs,
                         warm_start=self.warm_start,
                         n_calibration_batches=self.n_calibration_batches, progress=progress)
