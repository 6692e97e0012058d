"""What the search needs of the layers around it, as typing Protocols: the workload it fine-tunes
plans on (autorank.workload.Workload implements it), the device it sizes plans for
(autorank.workload.DeviceProfile), and the tracker it reports to (autorank.tracking.MlflowTracker).

The search reads these attributes and nothing else: no attribute probes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from autorank.plan.plan import FineTuneSettings, Plan
from autorank.search.records import TrialRecord
from autorank.search.result import SearchResult


class FineTuneOutcome(Protocol):
    """What one fine-tuning run reports (autorank.workload.FineTuneResult)."""

    val_accuracy: float
    train_loss: float
    measured_activation_bytes: int  # saved for backward in one training step at input_shape
    measured_flops: int  # FLOPs of that step, counted on real tensors
    val_loss: float  # mean cross-entropy on the held-out data (per token for a language model)
    train_wall_s: float
    epochs: int


class Workload(Protocol):
    """The base model, the device's batch and the fine-tuning of one plan."""

    @property
    def model(self) -> nn.Module: ...  # base model, no plan, in its fine-tuning mode

    @property
    def input_shape(self) -> tuple[int, ...]: ...  # the batch the device trains with

    @property
    def num_classes(self) -> int: ...

    @property
    def loss(self) -> str: ...  # "class" or "token" (a language model): autorank.cost.loss

    @property
    def checkpoint_sha256(self) -> str: ...  # of the base weights: keys the profile and the study

    @property
    def val_count(self) -> int | None: ...  # validation images (the summary's noise); None: a language model

    def example_input(self) -> Tensor: ...

    def calibration_batches(self, n: int) -> list[tuple[Tensor, Tensor]]: ...

    def finetune_settings(self, max_epochs: int | None = None, *, max_steps: int | None = None,
                          **hparams: float) -> FineTuneSettings: ...
    # resolved once per run: the length (max_steps, else the trainer's steps, else epochs) and
    # the trainer's lr, momentum, weight_decay with `hparams` (a trial's searched values) over them

    def finetune(self, plan: Plan, settings: FineTuneSettings, *,
                 progress: bool | None = None) -> FineTuneOutcome: ...
    # trains as `settings` say: the same object the plan file records


class Device(Protocol):
    """The target device (autorank.workload.DeviceProfile)."""

    name: str

    @property
    def budget_bytes(self) -> int: ...

    def step_time_s(self, flops: float) -> float: ...

    def process_peak(self, tensor_peak_bytes: int) -> Any:
        """The training process's predicted peak (autorank.cost.process.ProcessPrediction:
        .total_bytes) for a plan whose tensors peak at `tensor_peak_bytes`."""


def device_summary(device: Device) -> dict[str, Any]:
    """The device's figures for a tracker: every field of a dataclass device (its `sources`, long
    text, left out) plus the budget in bytes."""
    d: dict[str, Any] = {"name": device.name}
    if dataclasses.is_dataclass(device):
        d.update({f.name: getattr(device, f.name) for f in dataclasses.fields(device)
                  if f.name != "sources"})
    d["budget_bytes"] = int(device.budget_bytes)
    d["process_budget_bytes"] = int(device.process_peak(device.budget_bytes).total_bytes)
    return d


class Tracker(Protocol):
    """Where a study reports (autorank.tracking.MlflowTracker)."""

    def start_study(self, info: Mapping[str, Any]) -> Any: ...

    def log_trial(self, record: TrialRecord) -> Any: ...

    def end_study(self, result: SearchResult, plan_files: Mapping[int, Path]) -> None: ...

    def abort_study(self, interrupted: Sequence[TrialRecord]) -> None: ...
    # SIGINT/SIGTERM: the interrupted trials' runs and the study's run ended KILLED

    def log_single_run(self, info: Mapping[str, Any], choices: Mapping[str, str],
                       metrics: Mapping[str, float | None],
                       artifacts: Mapping[str, Path] = ...) -> Any: ...
