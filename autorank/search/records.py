"""A trial as the study stores it, and the front read back from storage.

Every trial keeps its plan and figures in one user attr, `autorank` (TrialRecord.to_attrs: one
storage write), so the study's storage alone is enough to rebuild the front and export a plan.
The front is Optuna's own, `study.best_trials` (constraint-aware: only trials whose constraints
are all <= 0); the study, the tracker and `python -m autorank.export` all read it through
`records_from_study`, which marks each record's `on_front`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autorank.units import MB

if TYPE_CHECKING:  # imported where used: a record and its plan file need no Optuna (the knapsack planner)
    import optuna
    from optuna.trial import FrozenTrial

RECORD_ATTR = "autorank"  # the user attr holding a trial's record
# Study user attrs (refit.py): refit results {trial number (str): {accuracy, steps, seed, hparams}}
# and the reference points {name: {choices, accuracy, steps, peak_bytes, over_budget, ...}}.
REFIT_ATTR = "refit"
REFERENCE_ATTR = "references"
DIRECTIONS = ("maximize", "minimize", "minimize")
OBJECTIVE_NAMES = ("val_accuracy", "peak_mb", "train_flops")
# a record's fields read from the study's REFIT_ATTR, not stored with the trial
REFIT_FIELDS = ("refit_accuracy", "refit_steps", "refit_val_loss", "refit_finetune")


@dataclass
class TrialRecord:
    number: int
    state: str  # complete | infeasible | failed | running | waiting | skipped (surplus, never run)
    choices: dict[str, str] = field(default_factory=dict)
    hparams: dict[str, float] = field(default_factory=dict)  # searched trainer settings (lr, ...)
    plan: dict | None = None  # Plan.to_dict(), no fingerprint (export_plan stamps it)
    val_accuracy: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None  # held-out mean cross-entropy (per token: perplexity = exp)
    epochs: int | None = None
    steps: int | None = None  # SGD steps of the trial (proxy fidelity)
    predicted_peak_bytes: int | None = None
    predicted_activation_bytes: int | None = None
    measured_activation_bytes: int | None = None
    flops: int | None = None
    measured_flops: int | None = None
    step_time_s: float | None = None
    wall_s: float | None = None
    train_wall_s: float | None = None
    fail_reason: str | None = None
    source: str | None = None  # warm start that enqueued it (knapsack, uniform asi@0.5, ...)
    duplicate_of: int | None = None  # an earlier trial of the same plan whose figures it reuses
    cost_model_mismatch: list[str] = field(default_factory=list)
    on_front: bool = False
    refit_accuracy: float | None = None  # at full fidelity (study user attr `refit`), when refit
    refit_steps: int | None = None
    refit_val_loss: float | None = None  # held-out cross-entropy after the refit
    refit_finetune: dict | None = None  # the refit's FineTuneSettings (to_dict), what its plan file records

    @property
    def peak_mb(self) -> float | None:
        return None if self.predicted_peak_bytes is None else self.predicted_peak_bytes / MB

    @property
    def feasible(self) -> bool:
        return self.state == "complete"

    @property
    def objectives(self) -> tuple[float, float, float]:
        """(accuracy, peak MB, FLOPs): what the trial returns to Optuna, in DIRECTIONS."""
        return (float(self.val_accuracy), self.predicted_peak_bytes / MB, float(self.flops))

    def to_attrs(self) -> dict[str, Any]:
        """The stored form: the fields that are set, less those the trial itself holds."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items()
                if k not in ("number", "on_front", *REFIT_FIELDS)
                and v is not None and v != [] and v != {}}

    @classmethod
    def from_frozen(cls, t: FrozenTrial, *, on_front: bool = False) -> TrialRecord:
        a = {**t.user_attrs, **(t.user_attrs.get(RECORD_ATTR) or {})}
        known = {f.name for f in dataclasses.fields(cls)} - {"number", "state", "on_front", *REFIT_FIELDS}
        rec = cls(number=t.number, state=_state(t, a.get("state")), on_front=on_front,
                  **{k: v for k, v in a.items() if k in known})
        rec.choices = dict(rec.choices or t.params)
        return rec


def _state(t: FrozenTrial, stored: str | None) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.FAIL:
        return "failed"
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    if t.state == TrialState.PRUNED:
        return "skipped"
    if t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values()):
        return "infeasible"
    return stored or "complete"


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of the study, `on_front` set from study.best_trials, the refit figures from
    the study's `refit` attr."""
    front = {t.number for t in study.best_trials}
    refit = study.user_attrs.get(REFIT_ATTR) or {}
    out = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.from_frozen(t, on_front=t.number in front)
        r = refit.get(str(t.number))
        if r is not None:
            rec.refit_accuracy, rec.refit_steps = float(r["accuracy"]), r.get("steps")
            rec.refit_val_loss, rec.refit_finetune = r.get("val_loss"), r.get("finetune")
        out.append(rec)
    return out


def records_from_storage(storage: str, study_name: str) -> list[TrialRecord]:
    import optuna

    return records_from_study(optuna.load_study(study_name=study_name, storage=storage))


def front_of(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.on_front]


def best_of(front: Sequence[TrialRecord]) -> TrialRecord | None:
    """Highest accuracy; ties: less memory, then fewer FLOPs, then the earlier trial."""
    return min(front, key=lambda r: (-r.val_accuracy, r.predicted_peak_bytes, r.flops, r.number),
               default=None)


def best_refit(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """Highest refit accuracy among the feasible refit trials; ties: less memory, then fewer
    FLOPs, then the earlier trial. None when none was refit."""
    done = [r for r in records if r.feasible and r.refit_accuracy is not None]
    return min(done, key=lambda r: (-r.refit_accuracy, r.predicted_peak_bytes, r.flops, r.number),
               default=None)
