"""The paper's planner end to end (conf/search/knapsack.yaml): profile -> knapsack under the
device budget -> fine-tune the plan -> tracker, plan file. Imports no Optuna: this path runs with
the torch core, Lightning (the workload) and rich alone."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorank.plan import Plan
from autorank.search.cost import PlanCost
from autorank.search.knapsack import KnapsackResult, knapsack
from autorank.search.planfile import export_record
from autorank.search.profile import Profile, profile_workload
from autorank.search.protocols import Device, Tracker, Workload, device_summary
from autorank.search.records import TrialRecord
from autorank.search.space import SearchSpace, load_space
from autorank.units import MB


@dataclass
class KnapsackRun:
    knapsack: KnapsackResult
    plan: Plan
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


def run_knapsack(workload: Workload, device: Device, space: SearchSpace | str, *,
                 tracker: Tracker | None = None, config: Mapping[str, Any] | None = None,
                 export_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 n_calibration_batches: int = 2, max_epochs: int | None = None,
                 progress: bool = True) -> KnapsackRun:
    """Profile (cached) -> knapsack under device.budget_bytes -> fine-tune the plan -> accuracy,
    predicted/measured memory, FLOPs, step time -> tracker, plan file at `export_path`.
    Raises BudgetTooSmall (its message names the minimum in MB) when nothing fits."""
    t0 = time.perf_counter()
    space = load_space(space)
    prof = profile_workload(workload, space, n_batches=n_calibration_batches, cache_dir=cache_dir,
                            progress=progress)
    cost = PlanCost(workload.model, workload.example_input(), prof, loss=workload.loss)
    res = knapsack(prof, device.budget_bytes, cost.peak)
    peak, flops = cost.peak(res.choices), int(cost.flops(res.choices))
    plan = prof.to_plan(res.choices, meta={
        "source": "knapsack", "budget_bytes": int(device.budget_bytes), "device": device.name,
        "predicted_peak_bytes": res.predicted_peak_bytes,
        "process_peak_bytes": int(device.process_peak(res.predicted_peak_bytes).total_bytes),
        "predicted_activation_bytes": int(peak.activation_bytes), "train_flops": flops,
        "sensitivity": res.sensitivity, "finetune": workload.finetune_settings(max_epochs).to_dict()})
    res.plan = plan
    ft = workload.finetune(plan, max_epochs=max_epochs, progress=progress)
    acc = float(ft.val_accuracy)
    # the planner's one plan as a record (no study, so no trial number), written as a trial's is
    rec = TrialRecord(number=0, state="complete", choices=dict(res.choices), plan=plan.to_dict(),
                      val_accuracy=acc, val_loss=float(ft.val_loss),
                      predicted_peak_bytes=res.predicted_peak_bytes, flops=flops)
    out = None if export_path is None else export_record(rec, export_path, workload.model)
    run = KnapsackRun(knapsack=res, plan=plan, profile=prof, val_accuracy=acc,
                      predicted_peak_bytes=res.predicted_peak_bytes,
                      predicted_activation_bytes=int(peak.activation_bytes),
                      measured_activation_bytes=ft.measured_activation_bytes, train_flops=flops,
                      step_time_s=float(device.step_time_s(flops)), export_path=out, run_id=None,
                      wall_s=time.perf_counter() - t0)
    if tracker is not None:
        run.run_id = tracker.log_single_run(
            {"kind": "knapsack", "config": dict(config or {}), "device": device_summary(device),
             "budget_bytes": int(device.budget_bytes), "space": space.to_dict()},
            res.choices,
            {"val_accuracy": run.val_accuracy, "val_loss": float(ft.val_loss), "predicted_peak_mb": res.predicted_peak_bytes / MB,
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

    def run(self, workload: Workload, device: Device, *, sampler: Any = None,
            tracker: Tracker | None = None, config: Mapping[str, Any] | None = None,
            run_dir: str | Path = ".", export_path: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: bool = True) -> KnapsackRun:
        """The app's call (the same as OptunaSearch.run); `sampler` and `run_dir` are unused."""
        return run_knapsack(workload, device, self.space, tracker=tracker, config=config,
                            export_path=export_path, cache_dir=cache_dir,
                            n_calibration_batches=self.n_calibration_batches,
                            max_epochs=self.max_epochs, progress=progress)
