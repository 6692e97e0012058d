"""One trial of the study: choices -> plan -> predicted cost -> constraints -> fine-tune -> record.

Objectives: validation accuracy (max), predicted peak training memory in MB (min), training FLOPs
per step (min). Constraints (Optuna 5 `trial.set_constraint`, feasible when <= 0):
`peak_minus_budget_bytes` = predicted peak - budget, and `no_trained_layer` (1 when the plan
trains nothing). A plan over budget is recorded from its prediction alone (accuracy 0, state
infeasible) and never trained. A plan identical to an earlier complete trial reuses its figures
(`duplicate_of`) instead of training again.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from rich.console import Console

from autorank import interrupt
from autorank.interrupt import Interrupted
from autorank.plan import Plan
from autorank.plan.plan import FineTuneSettings
from autorank.search.cost import CostModel
from autorank.search.profile import Profile
from autorank.search.protocols import Device, Workload
from autorank.search.records import RECORD_ATTR, TrialRecord

MISMATCH_TOLERANCE = 0.01  # measured vs predicted cost, relative
START = "start"  # the searched first trained candidate of a `fill: full` space (an Optuna param)


def start_param(profile: Profile, choices: Mapping[str, str]) -> dict[str, str]:
    """{START: the first candidate the plan trains} for a `fill: full` profile (what a warm
    start enqueues beside its choices), else {}."""
    if not profile.order:
        return {}
    names = profile.candidate_names
    return {START: next((n for n in names if choices.get(n, "frozen") != "frozen"), names[-1])}


@dataclass
class TimeSplit:
    """Where a study's wall time went, in seconds."""

    profile: float = 0.0
    predict: float = 0.0
    train: float = 0.0
    log: float = 0.0

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - t0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def cost_model_mismatches(rec: TrialRecord) -> list[str]:
    """A message for each measured figure more than MISMATCH_TOLERANCE off its prediction."""
    out = []
    for what, measured, predicted in (
            ("saved activation bytes", rec.measured_activation_bytes, rec.predicted_activation_bytes),
            ("FLOPs", rec.measured_flops, rec.flops)):
        if measured is None or predicted is None:
            continue
        d = abs(measured - predicted) / max(abs(predicted), 1)
        if d > MISMATCH_TOLERANCE:
            out.append(f"COST MODEL MISMATCH in trial {rec.number}: measured {what} {measured} vs "
                       f"predicted {predicted} ({100 * d:.1f}% off, tolerance 1%): the cost model is wrong")
    return out


class PlanTrial:
    """The study's objective: `study.optimize(PlanTrial(...))`. `plan_meta` goes into every
    plan's meta; `done`: finished trials of the study so far (a plan already trained is reused)."""

    def __init__(self, workload: Workload, device: Device, profile: Profile, cost: CostModel, *,
                 plan_meta: Mapping[str, Any], max_epochs: int | None,
                 times: TimeSplit | None = None, done: Iterable[TrialRecord] = (),
                 hparams: Mapping[str, Mapping[str, Any]] | None = None, trial_steps: int | None):
        """hparams: the space's searched trainer settings {name: {low, high, log}}; trial_steps,
        max_epochs: the trial's length as the search config gives it, resolved per trial by
        workload.finetune_settings (the one place where steps override epochs)."""
        self.workload, self.device, self.profile, self.cost = workload, device, profile, cost
        self.plan_meta, self.max_epochs = dict(plan_meta), max_epochs
        self.hparams, self.trial_steps = {k: dict(v) for k, v in (hparams or {}).items()}, trial_steps
        self.times = times or TimeSplit()
        self.names = profile.layer_names
        self.trained: dict[tuple[str, ...], TrialRecord] = {}
        self.seen: set[int] = set()  # trial numbers remembered
        for r in done:
            self.remember(r)

    def key(self, choices: Mapping[str, str], hparams: Mapping[str, float]) -> tuple:
        """Two trials are the same plan when their choices and hparams match."""
        return tuple(choices.get(n, "frozen") for n in self.names) + tuple(sorted(hparams.items()))

    def remember(self, rec: TrialRecord) -> None:
        """A complete, trained trial: later trials of the same plan reuse its figures."""
        self.seen.add(rec.number)
        if rec.state == "complete" and rec.duplicate_of is None:
            self.trained.setdefault(self.key(rec.choices, rec.hparams), rec)

    def suggest_choices(self, trial: optuna.Trial) -> dict[str, str]:
        """One choice per candidate. A `fill: full` space first suggests where the trained region
        starts (START, uniform over the candidates), the candidates before it frozen: sampled
        per layer, nearly every plan would start at the first layer (P(frozen) = 1/8 each)."""
        starts = self.profile.candidate_names  # blocks are no start
        first = self.names.index(trial.suggest_categorical(START, starts)) if self.profile.order else 0
        out = {}
        for i, n in enumerate(self.names):
            cs = self.profile.layer(n).choices
            out[n] = "frozen" if i < first and "frozen" in cs else trial.suggest_categorical(n, cs)
        return out

    def learn(self, study: optuna.Study) -> None:
        """Remember the complete trials stored since: another worker's, sharing the storage."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.number not in self.seen:
                self.remember(TrialRecord.from_frozen(t))

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        rec = TrialRecord(number=trial.number, state="running", choices={}, hparams={})
        t0 = time.perf_counter()
        try:  # from here on a signal leaves the trial's record, with its reason
            interrupt.check()  # a signal swallowed since the last trial (autorank.interrupt.check)
            rec.choices = self.suggest_choices(trial)
            rec.hparams = {k: trial.suggest_float(k, float(r["low"]), float(r["high"]), log=bool(r.get("log", False)))
                           for k, r in self.hparams.items()}
            plan, settings = self.predict(rec)
            for name, value in self.constraints(rec).items():
                trial.set_constraint(name, value)
            if rec.state != "infeasible":
                self.learn(trial.study)
                self.fit(rec, plan, settings)
        except Interrupted as e:
            rec.state, rec.fail_reason = "failed", f"interrupted by {e.signal_name}"
            raise
        except Exception as e:
            rec.state, rec.fail_reason = "failed", f"{type(e).__name__}: {e}"[:2000]
            raise
        finally:
            rec.wall_s = time.perf_counter() - t0
            trial.set_user_attr(RECORD_ATTR, rec.to_attrs())
        return rec.objectives

    def predict(self, rec: TrialRecord) -> tuple[Plan, FineTuneSettings]:
        """The plan, its fine-tuning settings (recorded in the plan, passed whole to
        workload.finetune) and its predicted cost; state infeasible when over budget or training
        nothing."""
        with self.times.timed("predict"):
            ft = self.workload.finetune_settings(self.max_epochs, max_steps=self.trial_steps, **rec.hparams)
            plan = self.profile.to_plan(rec.choices, meta={**self.plan_meta, "trial": rec.number,
                                                           "finetune": ft.to_dict()})
            peak = self.cost.peak(rec.choices)
            rec.predicted_peak_bytes = int(peak.total_bytes)
            rec.predicted_activation_bytes = int(peak.activation_bytes)
            rec.flops = int(self.cost.flops(rec.choices))
            rec.step_time_s = float(self.device.step_time_s(rec.flops))
            plan.meta.update(predicted_peak_bytes=rec.predicted_peak_bytes, train_flops=rec.flops,
                             predicted_activation_bytes=rec.predicted_activation_bytes,
                             # the whole process on the device (runtime + tensors): a plan file
                             # written from the stored record alone carries it too
                             process_peak_bytes=int(self.device.process_peak(rec.predicted_peak_bytes).total_bytes))
            rec.plan = plan.to_dict()
        if not plan.trained_layers():
            rec.state, rec.val_accuracy, rec.fail_reason = "infeasible", 0.0, "plan trains no layer"
        elif rec.predicted_peak_bytes > self.device.budget_bytes:
            rec.state, rec.val_accuracy = "infeasible", 0.0
        return plan, ft

    def constraints(self, rec: TrialRecord) -> dict[str, float]:
        trains = any(c != "frozen" for c in rec.choices.values())
        return {"peak_minus_budget_bytes": float(rec.predicted_peak_bytes - self.device.budget_bytes),
                "no_trained_layer": 0.0 if trains else 1.0}

    def fit(self, rec: TrialRecord, plan: Plan, settings: FineTuneSettings) -> None:
        """Fine-tune the plan (or reuse an earlier trial of the same plan) into `rec`."""
        prev = self.trained.get(self.key(rec.choices, rec.hparams))
        if prev is not None:
            rec.state, rec.val_accuracy, rec.duplicate_of = "complete", prev.val_accuracy, prev.number
            rec.val_loss = prev.val_loss
            rec.measured_activation_bytes = prev.measured_activation_bytes
            return
        with self.times.timed("train"):
            res = self.workload.finetune(plan, settings, progress=False)
        acc = float(res.val_accuracy)
        if not math.isfinite(acc):
            raise ValueError(f"validation accuracy is {acc}")
        rec.state, rec.val_accuracy, rec.train_loss, rec.epochs = "complete", acc, res.train_loss, res.epochs
        rec.val_loss = float(res.val_loss) if math.isfinite(res.val_loss) else None
        rec.steps = settings.max_steps
        rec.measured_activation_bytes, rec.measured_flops = res.measured_activation_bytes, res.measured_flops
        rec.train_wall_s = res.train_wall_s
        rec.cost_model_mismatch = cost_model_mismatches(rec)
        for msg in rec.cost_model_mismatch:
            warnings.warn(msg, stacklevel=2)
            Console(stderr=True).print(f"[bold red]{msg}[/]")
        self.remember(rec)
