"""The paper's planner end to end (conf/search/knapsack.yaml): profile -> knapsack under the
device budget -> fine-tune the plan -> tracker, plan file. Imports no Optuna: this path runs with
the torch core, Lightning (the workload) and rich alone."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorank.search.cost import PlanCost
from autorank.search.knapsack import knapsack
from autorank.search.planfile import export_record
from autorank.search.profile import profile_workload
from autorank.search.protocols import Device, Tracker, Workload, device_summary
from autorank.search.records import TrialRecord
from autorank.search.result import SearchResult
from autorank.search.space import SearchSpace, load_space
from autorank.units import MB


def run_knapsack(workload: Workload, device: Device, space: SearchSpace | str, *,
                 n_calibration_batches: int, max_epochs: int | None,
                 tracker: Tracker | None = None, config: Mapping[str, Any] | None = None,
                 export_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True) -> SearchResult:
    """Profile (cached) -> knapsack under device.budget_bytes -> fine-tune the plan -> accuracy,
    predicted/measured memory, FLOPs, step time -> tracker, plan file at `export_path`. The one
    plan is the result's one trial (number 0), its front and its export.
    Raises BudgetTooSmall (its message names the minimum in MB) when nothing fits."""
    t0 = time.perf_counter()
    space = load_space(space)
    prof = profile_workload(workload, space, n_batches=n_calibration_batches, cache_dir=cache_dir,
                            progress=progress)
    cost = PlanCost(workload.model, workload.example_input(), prof, loss=workload.loss)
    res = knapsack(prof, device.budget_bytes, cost.peak)
    peak, flops = cost.peak(res.choices), int(cost.flops(res.choices))
    settings = workload.finetune_settings(max_epochs)
    plan = prof.to_plan(res.choices, meta={
        "source": "knapsack", "budget_bytes": int(device.budget_bytes), "device": device.name,
        "predicted_peak_bytes": res.predicted_peak_bytes,
        "process_peak_bytes": int(device.process_peak(res.predicted_peak_bytes).total_bytes),
        "predicted_activation_bytes": int(peak.activation_bytes), "train_flops": flops,
        "sensitivity": res.sensitivity, "finetune": settings.to_dict()})
    res.plan = plan
    ft = workload.finetune(plan, settings, progress=progress)
    acc = float(ft.val_accuracy)
    # the planner's one plan as a record (no study, so no trial number), written as a trial's is
    rec = TrialRecord(number=0, state="complete", choices=dict(res.choices), plan=plan.to_dict(),
                      val_accuracy=acc, val_loss=float(ft.val_loss), source="knapsack",
                      predicted_peak_bytes=res.predicted_peak_bytes,
                      predicted_activation_bytes=int(peak.activation_bytes),
                      measured_activation_bytes=ft.measured_activation_bytes, flops=flops,
                      measured_flops=ft.measured_flops, step_time_s=float(device.step_time_s(flops)),
                      steps=settings.max_steps, epochs=ft.epochs, on_front=True)
    out = None if export_path is None else export_record(rec, export_path, workload.model)
    result = SearchResult(search="knapsack", budget_bytes=int(device.budget_bytes), trials=[rec], front=[rec],
                          best=rec, loss=workload.loss, export_path=out, wall_s=time.perf_counter() - t0)
    if tracker is not None:
        result.run_id = tracker.log_single_run(
            {"kind": "knapsack", "config": dict(config or {}), "device": device_summary(device),
             "budget_bytes": int(device.budget_bytes), "space": space.to_dict()},
            res.choices,
            {"val_accuracy": acc, "val_loss": float(ft.val_loss), "predicted_peak_mb": res.predicted_peak_bytes / MB,
             "predicted_peak_bytes": res.predicted_peak_bytes,
             "predicted_activation_bytes": rec.predicted_activation_bytes,
             "measured_activation_bytes": rec.measured_activation_bytes, "train_flops": flops,
             "predicted_step_time_s": rec.step_time_s, "sensitivity": res.sensitivity,
             "min_peak_mb": res.min_peak_bytes / MB, "wall_s": result.wall_s},
            {"plan": out} if out is not None else {})
    return result


@dataclass(frozen=True, kw_only=True)
class KnapsackSearch:
    """conf/search/knapsack.yaml, instantiated by Hydra: every field from there (the YAML holds
    the defaults)."""

    name: str
    space: Any  # a space name, a file, or the `space` group's mapping (search.space.load_space)
    n_calibration_batches: int
    max_epochs: int | None
    export_path: str | Path | None
    cache_dir: str | Path | None
    progress: bool

    def run(self, workload: Workload, device: Device, *, sampler: Any = None,
            tracker: Tracker | None = None, config: Mapping[str, Any] | None = None) -> SearchResult:
        """The app's call (the same as OptunaSearch.run); `sampler` is unused."""
        return run_knapsack(workload, device, self.space, tracker=tracker, config=config,
                            export_path=self.export_path, cache_dir=self.cache_dir,
                            n_calibration_batches=self.n_calibration_batches,
                            max_epochs=self.max_epochs, progress=self.progress)
