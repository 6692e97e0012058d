"""What the `search` config group builds (conf/search/*.yaml): a settings object whose `run` the
app calls with the objects it has built (workload, device, sampler, tracker).

`OptunaSearch` lives here (it imports Optuna); the paper's planner, `KnapsackSearch`, lives in
planner.py, which does not, and is re-exported here for the old import path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autorank.search.planner import KnapsackRun, KnapsackSearch, run_knapsack
from autorank.search.protocols import Device, Tracker, Workload
from autorank.search.space import load_space
from autorank.search.storage import HEARTBEAT_S, check_driver
from autorank.search.study import StudyResult, StudySettings, run_study

__all__ = ["KnapsackRun", "KnapsackSearch", "OptunaSearch", "run_knapsack"]


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
    trial_steps: int | None = None
    refit_steps: int | None = None
    refit_top: int = 3
    references: bool = True
    warm_start: bool = True
    n_calibration_batches: int = 2
    heartbeat_s: int | None = HEARTBEAT_S  # a running trial's heartbeat (a dead worker's trial is retried)
    name: str = "optuna"

    def __post_init__(self) -> None:
        if self.storage:  # before pretraining: a PostgreSQL URL without its driver
            check_driver(self.storage)

    def settings(self, *, run_dir: str | Path = ".", export_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True) -> StudySettings:
        return StudySettings(
            n_trials=self.n_trials, n_trials_total=self.n_trials_total, timeout=self.timeout,
            storage=self.storage, study_name=self.study_name, max_epochs=self.max_epochs,
            trial_steps=self.trial_steps, refit_steps=self.refit_steps, refit_top=self.refit_top,
            references=self.references, warm_start=self.warm_start, n_calibration_batches=self.n_calibration_batches,
            run_dir=run_dir, export_path=export_path, cache_dir=cache_dir, progress=progress,
            heartbeat_s=self.heartbeat_s)

    def run(self, workload: Workload, device: Device, *,
            sampler: optuna.samplers.BaseSampler | None = None, tracker: Tracker | None = None,
            config: Mapping[str, Any] | None = None, run_dir: str | Path = ".",
            export_path: str | Path | None = None, cache_dir: str | Path | None = None,
            progress: bool = True) -> StudyResult:
        settings = self.settings(run_dir=run_dir, export_path=export_path, cache_dir=cache_dir,
                                 progress=progress)
        return run_study(workload, device, load_space(self.space), settings, sampler=sampler,
                         tracker=tracker, config=config)
