"""Many workers (or one, stopped and started again), one study: which trials count toward
`n_trials`, when a worker starts another trial, and how an interrupted trial is closed.

What counts: complete trials (infeasible ones included: Optuna stores them COMPLETE with a
violated constraint) and failed ones that were not queued again. A trial whose worker died or was
interrupted is FAIL and has a WAITING copy (`retry_history` in its system attrs, written by
storage.RetryTrial): the copy counts, the original does not. So after any fault,
running the same command finishes the study with exactly n_trials counted trials.

Exactness with N workers: Optuna numbers trials atomically, so a worker that has just been given
trial k runs it only while fewer than n_trials trials are counted or running with a number below
k; otherwise the trial is surplus (a race between workers) and is closed PRUNED at once, without
training. The same happens to a warm-start plan that two workers enqueued at the same moment.
A worker whose remaining trials are all running elsewhere waits for them (they may die and come
back WAITING) when the storage has a heartbeat, and stops when they are done.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autorank.interrupt import Interrupted
from autorank.search.records import RECORD_ATTR
from autorank.search.storage import RetryTrial

SURPLUS_ATTR = "surplus"  # user attr of a trial closed PRUNED unrun (why)


def retried(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were queued again (a later trial lists them in retry_history)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def counts(t: FrozenTrial, retried_numbers: set[int]) -> bool:
    """Does the trial count toward n_trials?"""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in retried_numbers)


@dataclass
class Census:
    counted: int = 0
    running: list[int] = field(default_factory=list)  # numbers of RUNNING trials
    waiting: int = 0

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> Census:
        again = retried(trials)
        return cls(counted=sum(counts(t, again) for t in trials),
                   running=[t.number for t in trials if t.state == TrialState.RUNNING],
                   waiting=sum(t.state == TrialState.WAITING for t in trials))


def surplus_reason(trials: Sequence[FrozenTrial], number: int, target: int) -> str | None:
    """Why trial `number` (just handed to this worker) must not run, or None."""
    again = retried(trials)
    mine = next(t for t in trials if t.number == number)
    ahead = sum(counts(t, again) or (t.state == TrialState.RUNNING and t.number < number) for t in trials)
    if ahead >= target:
        return f"{ahead} trials counted or running before it: n_trials={target} reached"
    fixed = mine.system_attrs.get("fixed_params")
    if fixed:
        for t in trials:
            # a PRUNED twin was itself skipped (a duplicate of this plan, or surplus): it trains
            # nothing, so only a twin that trained, trains or will train makes this one redundant
            if (t.number < number and t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
                    and t.system_attrs.get("fixed_params") == fixed):
                return f"the same plan was enqueued as trial {t.number}"
    return None


class GuardedObjective:
    """The objective, run only when the trial is not surplus; remembers the trials it started
    (to close them when interrupted) and puts their number on an Interrupted."""

    def __init__(self, objective: Callable[[optuna.Trial], Any], target: int):
        self.objective, self.target = objective, int(target)
        self.started: list[int] = []

    def __call__(self, trial: optuna.Trial) -> Any:
        self.started.append(trial.number)
        try:
            why = surplus_reason(trial.study.get_trials(deepcopy=False), trial.number, self.target)
            if why is not None:
                trial.set_user_attr(SURPLUS_ATTR, why)
                raise optuna.TrialPruned(why)
            return self.objective(trial)
        except Interrupted as e:
            e.trial = trial.number
            if RECORD_ATTR not in trial.user_attrs:  # it came before the trial's own record
                trial.set_user_attr(RECORD_ATTR, {"state": "failed", "fail_reason": f"interrupted by {e.signal_name}"})
            raise


def run_trials(study: optuna.Study, objective: GuardedObjective, *, timeout: float | None,
               callbacks: Sequence[Callable], heartbeat_s: int | None, poll_s: float | None = None) -> None:
    """Start trials until objective.target trials count and none waits (module doc)."""
    t0 = time.monotonic()
    poll_s = poll_s or max(1.0, (heartbeat_s or 1) / 2)
    while True:
        if heartbeat_s:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        c = Census.of(study.get_trials(deepcopy=False))
        if c.counted >= objective.target and c.waiting == 0:
            return
        if timeout is not None and time.monotonic() - t0 >= timeout:
            return
        if c.waiting == 0 and c.counted + len(c.running) >= objective.target:
            if not heartbeat_s:
                return  # without a heartbeat a dead worker's trial never comes back: nothing to wait for
            time.sleep(poll_s)
            continue
        study.optimize(objective, n_trials=1, callbacks=list(callbacks), catch=(Exception,),
                       gc_after_trial=False, show_progress_bar=False)


def close_interrupted(study: optuna.Study, numbers: Sequence[int]) -> list[FrozenTrial]:
    """Each of these trials still RUNNING: FAIL, and queued again (a WAITING copy, as for a dead
    worker's trial). Returns the failed trials."""
    out = []
    for n in numbers:
        trials = study.get_trials(deepcopy=False)  # in number order, numbers 0, 1, ...
        t = trials[n] if n < len(trials) else None
        if t is None or t.number != n or t.state != TrialState.RUNNING:
            continue
        study.tell(n, state=TrialState.FAIL)
        failed = study.get_trials(deepcopy=True)[n]
        RetryTrial()(study, failed)
        out.append(failed)
    return out
