"""The search's one cost predictor: a plan given as choice keys -> predicted peak training memory
and training FLOPs per step (autorank.cost), cached by the plan.

The profile, the knapsack, the warm start and every trial ask the same `PlanCost`, so a plan is
costed once per study however many steps need its figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

from torch import Tensor, nn

from autorank.cost import predict_peak_training_bytes, train_step_flops
from autorank.plan import Plan

Choices = Mapping[str, str]  # layer name -> choice key ("frozen", "full", "asi@0.8")


class PlanSource(Protocol):
    """What the cost model reads of a profile (search.profile.Profile, a layer above): choice
    keys -> the plan they stand for."""

    def to_plan(self, choices: Choices) -> Plan: ...


class PeakRecord(Protocol):
    """What the search reads of autorank.cost.PeakMemory."""

    total_bytes: int
    transient_bytes: int  # the largest transient: a max over layers, not a sum
    activation_bytes: int  # every tensor saved for backward


class CostModel(Protocol):
    def peak(self, choices: Choices) -> PeakRecord: ...
    def flops(self, choices: Choices) -> int: ...


def peak_parts(value: PeakRecord | int) -> tuple[int, int]:
    """(total, transient) bytes of a peak prediction; a plain int is a total with no transient
    part (a predictor that knows only totals)."""
    if isinstance(value, int):
        return value, 0
    return int(value.total_bytes), int(value.transient_bytes)


def plan_key(choices: Choices) -> tuple[tuple[str, str], ...]:
    """The trained choices, sorted: two choice dicts that train the same way have the same key."""
    return tuple(sorted((n, c) for n, c in choices.items() if c != "frozen"))


class PlanCost:
    """Predicted peak (autorank.cost.predict_peak_training_bytes) and FLOPs
    (autorank.cost.train_step_flops) of the plans of `profile`, for `model` on `example_input`
    (the device's batch), cached by `plan_key`. `peak_kwargs` go to the peak predictor
    (optimizer, momentum, loss: "token" for a language model)."""

    def __init__(self, model: nn.Module, example_input: Tensor, profile: PlanSource, **peak_kwargs):
        self.model, self.example_input, self.profile = model, example_input, profile
        self.peak_kwargs = peak_kwargs
        self.peaks: dict[tuple, PeakRecord] = {}
        self.flop_counts: dict[tuple, int] = {}

    def peak(self, choices: Choices) -> PeakRecord:
        """The step's peak as the device process meets it: the tensors' peak raised by the CPU
        convolutions' scratch where it occurs (PeakMemory.kernel_bytes, no tensor), so that every
        budget comparison of the search counts it."""
        k = plan_key(choices)
        if k not in self.peaks:
            pm = predict_peak_training_bytes(
                self.model, self.example_input, self.profile.to_plan(choices), **self.peak_kwargs)
            self.peaks[k] = dataclasses.replace(pm, total_bytes=pm.training_bytes, kernel_bytes=0,
                                                transient_bytes=pm.transient_bytes + pm.kernel_bytes)
        return self.peaks[k]

    def flops(self, choices: Choices) -> int:
        k = plan_key(choices)
        if k not in self.flop_counts:
            self.flop_counts[k] = int(train_step_flops(self.model, self.example_input,
                                                       self.profile.to_plan(choices)))
        return self.flop_counts[k]
