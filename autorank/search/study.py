"""The main job: a multi-objective Optuna study of per-layer plans under the device budget.

Objectives: validation accuracy (max), predicted peak training memory in MB (min), training FLOPs
per step (min). Constraints (Optuna 5 `trial.set_constraint`, feasible when <= 0):
`peak_minus_budget_bytes` = predicted peak - budget, and `no_trained_layer` (1 when the plan
trains nothing). A plan over budget is recorded from its prediction alone (accuracy 0, tag
infeasible) and never trained.

Every trial keeps its plan and figures in one user attr, `autorank` (a dict: `plan`, `choices`,
`state`, `predicted_peak_bytes`, `flops`, `measured_activation_bytes`, ...; one storage write), so the study's storage alone
is enough to rebuild the front and export a plan (autorank.export).

Resuming: the same storage + study_name continues the study (load_if_exists). `n_trials` counts
the finished trials the study should hold in total (`n_trials_total=True`, the default: running the
same command again after an interruption finishes the rest, after completion does nothing), or the
new trials of this run (`n_trials_total=False`). Warm-start trials are enqueued with
skip_if_exists, so a resumed study never enqueues them twice. A sampled plan identical to an
earlier complete trial reuses its figures (user attr `duplicate_of`) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from autorank.search.knapsack import BudgetTooSmall, knapsack
from autorank.search.profile import Profile, peak_parts
from autorank.search.space import SearchSpace, level_key
from autorank.units import MB  # re-exported: export.py, runners.py import it from here

DIRECTIONS = ("maximize", "minimize", "minimize")
OBJECTIVE_NAMES = ("val_accuracy", "peak_mb", "train_flops")
MISMATCH_TOLERANCE = 0.01
RECORD_ATTR = "autorank"  # one user attr per trial holds its plan and figures (one storage write)


class CostModel(Protocol):
    def peak(self, choices: Mapping[str, str]) -> Any: ...  # PeakMemory-like
    def flops(self, choices: Mapping[str, str]) -> int: ...


class Tracker(Protocol):  # implemented by autorank.tracking.MlflowTracker
    def start_study(self, info: Mapping[str, Any]) -> None: ...
    def log_trial(self, record: "TrialRecord") -> None: ...
    def end_study(self, result: "StudyResult", plan_files: Mapping[int, Path]) -> None: ...


class WorkloadCost:
    """Predicted peak (autorank.cost.predict_peak_training_bytes) and FLOPs of a plan, cached."""

    def __init__(self, model, example_input, profile: Profile, **cost_kwargs):
        self.model, self.example_input, self.profile = model, example_input, profile
        self.cost_kwargs = cost_kwargs
        self._peak: dict[tuple, Any] = {}
        self._flops: dict[tuple, int] = {}

    @staticmethod
    def _key(choices):
        return tuple(sorted((n, c) for n, c in choices.items() if c != "frozen"))

    def peak(self, choices):
        from autorank.cost import predict_peak_training_bytes

        k = self._key(choices)
        if k not in self._peak:
            self._peak[k] = predict_peak_training_bytes(
                self.model, self.example_input, self.profile.to_plan(choices), **self.cost_kwargs)
        return self._peak[k]

    def flops(self, choices) -> int:
        from autorank.cost import train_step_flops

        k = self._key(choices)
        if k not in self._flops:
            self._flops[k] = int(train_step_flops(self.model, self.example_input,
                                                  self.profile.to_plan(choices)))
        return self._flops[k]


@dataclass
class TrialRecord:
    number: int
    state: str  # complete | infeasible | failed | running | waiting
    choices: dict[str, str] = field(default_factory=dict)
    plan: dict | None = None
    val_accuracy: float | None = None
    predicted_peak_bytes: int | None = None
    predicted_activation_bytes: int | None = None
    measured_activation_bytes: int | None = None
    flops: int | None = None
    measured_flops: int | None = None
    step_time_s: float | None = None
    wall_s: float | None = None
    train_wall_s: float | None = None
    fail_reason: str | None = None
    source: str | None = None
    duplicate_of: int | None = None
    on_front: bool = False

    @property
    def peak_mb(self) -> float | None:
        return None if self.predicted_peak_bytes is None else self.predicted_peak_bytes / MB

    @property
    def feasible(self) -> bool:
        return self.state == "complete"

    @property
    def objectives(self) -> tuple[float, float, float]:
        return (float(self.val_accuracy), self.predicted_peak_bytes / MB, float(self.flops))

    @classmethod
    def from_frozen(cls, t: optuna.trial.FrozenTrial) -> "TrialRecord":
        a = {**t.user_attrs, **(t.user_attrs.get(RECORD_ATTR) or {})}
        state = a.get("state")
        if t.state == TrialState.FAIL:
            state = "failed"
        elif t.state == TrialState.RUNNING:
            state = "running"
        elif t.state == TrialState.WAITING:
            state = "waiting"
        elif t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values()):
            state = "infeasible"
        elif state is None:
            state = "complete"
        return cls(
            number=t.number, state=state, choices=dict(a.get("choices") or t.params),
            plan=a.get("plan"), val_accuracy=a.get("val_accuracy"),
            predicted_peak_bytes=a.get("predicted_peak_bytes"),
            predicted_activation_bytes=a.get("predicted_activation_bytes"),
            measured_activation_bytes=a.get("measured_activation_bytes"), flops=a.get("flops"),
            measured_flops=a.get("measured_flops"), step_time_s=a.get("step_time_s"),
            wall_s=a.get("wall_s"), train_wall_s=a.get("train_wall_s"),
            fail_reason=a.get("fail_reason"), source=a.get("source"),
            duplicate_of=a.get("duplicate_of"))


@dataclass
class StudyResult:
    study_name: str
    storage: str
    budget_bytes: int
    trials: list[TrialRecord]
    front: list[TrialRecord]
    best: TrialRecord | None
    export_path: Path | None = None
    n_new: int = 0
    wall_s: float = 0.0
    time_split_s: dict[str, float] = field(default_factory=dict)  # profile, predict, train, log
    plan_files: dict[int, Path] = field(default_factory=dict)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b under DIRECTIONS (accuracy up, memory and FLOPs down)."""
    sa = (-a[0], a[1], a[2])
    sb = (-b[0], b[1], b[2])
    return all(x <= y for x, y in zip(sa, sb)) and any(x < y for x, y in zip(sa, sb))


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated feasible (complete, within budget) trials."""
    feas = [r for r in records if r.feasible]
    return [r for r in feas if not any(dominates(o.objectives, r.objectives) for o in feas)]


def best_of(front: Sequence[TrialRecord]) -> TrialRecord | None:
    """Highest accuracy; ties: less memory, then fewer FLOPs, then the earlier trial."""
    return min(front, key=lambda r: (-r.val_accuracy, r.predicted_peak_bytes, r.flops, r.number),
               default=None)


def records_from_storage(storage: str, study_name: str) -> list[TrialRecord]:
    study = optuna.load_study(study_name=study_name, storage=storage)
    return [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)]


def default_study_name(device_name: str, space: SearchSpace, key: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"space": space.sha256, **key}, sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
    return f"autorank-{device_name}-{space.name}-{h}"


def warm_start_plans(profile: Profile, budget_bytes: int, cost: CostModel) -> list[tuple[str, dict]]:
    """(source, choices) to enqueue first: the knapsack plan; plain backprop of every candidate
    (the baseline a user would try first: recorded infeasible from its prediction when it does
    not fit, never trained); uniform-level plans at the lowest, middle and highest ASI level (each
    trains every candidate, the expensive kind of trial, so not all levels); and the plainly
    trained last k layers that fit (k = 1..N)."""
    names = profile.layer_names
    out: list[tuple[str, dict]] = []
    try:
        res = knapsack(profile, budget_bytes, cost.peak)
        out.append(("knapsack", res.choices))
    except BudgetTooSmall as e:
        warnings.warn(f"no knapsack warm start: {e}", stacklevel=2)
    if all("full" in profile.layer(n).choices for n in names):
        out.append(("full every candidate", {n: "full" for n in names}))
    levels = sorted(profile.space.get("levels", []))
    for lv in sorted({levels[0], levels[len(levels) // 2], levels[-1]} if levels else set()):
        key = level_key(lv)
        ch = {n: key for n in names if key in profile.layer(n).choices}
        if ch:
            out.append((f"uniform {key}", {n: ch.get(n, "frozen") for n in names}))
    for k in range(1, len(names) + 1):
        ch = {n: ("full" if i >= len(names) - k else "frozen") for i, n in enumerate(names)}
        if all(c in profile.layer(n).choices for n, c in ch.items()) and \
                peak_parts(cost.peak(ch))[0] <= budget_bytes:
            out.append((f"full last {k}", ch))
    seen, uniq = set(), []
    for src, ch in out:
        k = tuple(ch[n] for n in names)
        if k not in seen:
            seen.add(k)
            uniq.append((src, ch))
    return uniq


def _rel_diff(measured, predicted) -> float | None:
    if measured is None or predicted is None:
        return None
    return abs(measured - predicted) / max(abs(predicted), 1)


def run_study(workload, device, space: SearchSpace, *, sampler: optuna.samplers.BaseSampler | None = None,
              storage: str | None = None, study_name: str | None = None, n_trials: int = 20,
              n_trials_total: bool = True, timeout: float | None = None, profile: Profile | None = None,
              cost: CostModel | None = None, tracker: Tracker | None = None,
              config: Mapping[str, Any] | None = None, run_dir: str | Path = ".",
              export_path: str | Path | None = None, cache_dir: str | Path | None = None,
              max_epochs: int | None = None, warm_start: bool = True,
              plan_meta: Mapping[str, Any] | None = None, n_calibration_batches: int = 2,
              progress: bool = True) -> StudyResult:
    """Search per-layer plans of `workload` under `device.budget_bytes` (see module doc).

    workload: the ARCHITECTURE.md `Workload` (finetune, model, example_input, ...).
    device: a DeviceProfile (name, budget_bytes, step_time_s(flops)).
    storage: any Optuna storage URL; None: sqlite:///<run_dir>/optuna.db.
    study_name: None derives one from the device, space, checkpoint and input shape, so the same
    command resumes the same study. profile/cost: computed from the workload when None.
    plan_meta: merged into every plan's meta (e.g. {"model": {"factory": "module:fn",
    "kwargs": {...}}} for scripts/finetune_on_device.py).
    Returns the StudyResult; the best feasible plan is written to `export_path` when given.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    split = {"profile": 0.0, "predict": 0.0, "train": 0.0, "log": 0.0}
    budget = int(device.budget_bytes)
    if profile is None:
        from autorank.search.profile import profile_workload

        t0 = time.perf_counter()
        profile = profile_workload(workload, space, n_batches=n_calibration_batches,
                                   cache_dir=cache_dir, progress=progress)
        split["profile"] = time.perf_counter() - t0
    if cost is None:
        cost = WorkloadCost(workload.model, workload.example_input(), profile)
    names = profile.layer_names
    if storage is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    elif storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if study_name is None:
        study_name = default_study_name(getattr(device, "name", "device"), space, {
            "ckpt": getattr(workload, "checkpoint_sha256", None),
            "input_shape": list(getattr(workload, "input_shape", [])), "budget": budget})
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=list(DIRECTIONS), load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVE_NAMES))
    previous = study.get_trials(deepcopy=False)  # the one full read of the study at start
    finished = [t for t in previous if t.state.is_finished()]
    if finished and sampler is not None and hasattr(sampler, "reseed_rng"):
        sampler.reseed_rng()  # a resumed seeded sampler would replay its first samples
    n_new = max(0, n_trials - len(finished)) if n_trials_total else int(n_trials)
    records: dict[int, TrialRecord] = {t.number: TrialRecord.from_frozen(t) for t in finished}
    done_by_key: dict[tuple, TrialRecord] = {
        tuple(r.choices.get(n, "frozen") for n in names): r for r in records.values()
        if r.state == "complete" and r.duplicate_of is None}
    if plan_meta is None:
        plan_meta = default_plan_meta(workload)
    base_meta = {"budget_bytes": budget, "device": getattr(device, "name", None),
                 "input_shape": list(getattr(workload, "input_shape", [])), **(plan_meta or {})}

    if tracker is not None:
        t0 = time.perf_counter()
        tracker.start_study({
            "config": dict(config or {}), "device": _device_dict(device), "budget_bytes": budget,
            "space": space.to_dict(), "sampler": type(sampler).__name__ if sampler else "TPESampler",
            "storage": storage, "study_name": study_name, "n_trials": n_trials, "timeout": timeout,
            "profile_key": profile.key})
        split["log"] += time.perf_counter() - t0
    if warm_start and n_new > 0:
        t0 = time.perf_counter()
        for src, ch in warm_start_plans(profile, budget, cost):
            study.enqueue_trial({n: ch[n] for n in names}, user_attrs={"source": src},
                                skip_if_exists=True)
        split["predict"] += time.perf_counter() - t0

    def objective(trial: optuna.Trial):
        t0 = time.perf_counter()
        choices = {n: trial.suggest_categorical(n, profile.layer(n).choices) for n in names}
        attrs: dict[str, Any] = {"choices": choices}
        try:
            plan = profile.to_plan(choices, meta={**base_meta, "trial": trial.number,
                                                  "study": study_name})
            pm = cost.peak(choices)
            peak = peak_parts(pm)[0]
            flops = int(cost.flops(choices))
            act = getattr(pm, "activation_bytes", None)
            n_trained = sum(c != "frozen" for c in choices.values())
            plan.meta.update({"predicted_peak_bytes": peak, "predicted_activation_bytes": act,
                              "train_flops": flops})
            attrs.update({"plan": plan.to_dict(), "predicted_peak_bytes": peak, "flops": flops,
                     "predicted_activation_bytes": act,
                     "step_time_s": float(device.step_time_s(flops))})
            trial.set_constraint("peak_minus_budget_bytes", float(peak - budget))
            trial.set_constraint("no_trained_layer", 1.0 if n_trained == 0 else 0.0)
            split["predict"] += time.perf_counter() - t0
            key = tuple(choices[n] for n in names)
            if peak > budget or n_trained == 0:
                attrs.update(state="infeasible", val_accuracy=0.0, wall_s=time.perf_counter() - t0,
                             fail_reason=None if n_trained else "plan trains no layer")
                _set_attrs(trial, attrs)
                return 0.0, peak / MB, float(flops)
            if key in done_by_key:  # same plan as an earlier trial: reuse, do not train again
                prev = done_by_key[key]
                attrs.update(state="complete", val_accuracy=prev.val_accuracy,
                             duplicate_of=prev.number,
                             measured_activation_bytes=prev.measured_activation_bytes,
                             wall_s=time.perf_counter() - t0)
                _set_attrs(trial, attrs)
                return prev.val_accuracy, peak / MB, float(flops)
            t1 = time.perf_counter()
            res = workload.finetune(plan, max_epochs=max_epochs, progress=False)
            split["train"] += time.perf_counter() - t1
            acc = float(res.val_accuracy)
            if not math.isfinite(acc):
                raise ValueError(f"validation accuracy is {acc}")
            measured = getattr(res, "measured_activation_bytes", None)
            mflops = getattr(res, "measured_flops", None)
            attrs.update(state="complete", val_accuracy=acc, train_loss=getattr(res, "train_loss", None),
                         measured_activation_bytes=measured, measured_flops=mflops,
                         train_wall_s=getattr(res, "train_wall_s", time.perf_counter() - t1),
                         epochs=getattr(res, "epochs", None), wall_s=time.perf_counter() - t0)
            for what, m, p in (("saved activation bytes", measured, act), ("FLOPs", mflops, flops)):
                d = _rel_diff(m, p)
                if d is not None and d > MISMATCH_TOLERANCE:
                    msg = (f"COST MODEL MISMATCH in trial {trial.number}: measured {what} {m} vs "
                           f"predicted {p} ({100 * d:.1f}% off, tolerance 1%): the cost model is wrong")
                    attrs.setdefault("cost_model_mismatch", []).append(msg)
                    warnings.warn(msg, stacklevel=2)
                    _console().print(f"[bold red]{msg}[/]")
            _set_attrs(trial, attrs)
            return acc, peak / MB, float(flops)
        except Exception as e:
            attrs.update(state="failed", fail_reason=f"{type(e).__name__}: {e}"[:2000],
                         wall_s=time.perf_counter() - t0)
            _set_attrs(trial, attrs)
            raise

    front_now = pareto_front(list(records.values()))
    bar_state = {"best": best_of(front_now), "front": front_now}
    progress_ctx = _progress(progress)

    def callback(study_: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
        t0 = time.perf_counter()
        rec = TrialRecord.from_frozen(ft)
        records[rec.number] = rec
        if rec.state == "complete" and rec.duplicate_of is None:
            done_by_key.setdefault(tuple(rec.choices.get(n, "frozen") for n in names), rec)
        if rec.feasible:  # the front changes only when a feasible trial arrives
            bar_state["front"] = pareto_front(bar_state["front"] + [rec])
            bar_state["best"] = best_of(bar_state["front"])
        if tracker is not None:
            tracker.log_trial(rec)
        best = bar_state["best"]
        progress_ctx.update(task, advance=1, description=(
            f"trials | best feasible acc {best.val_accuracy:.3f}" if best else
            "trials | no feasible trial yet") + f" | front {len(bar_state['front'])}")
        split["log"] += time.perf_counter() - t0

    with progress_ctx:
        task = progress_ctx.add_task("trials", total=n_new)
        if n_new > 0:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=n_new, timeout=timeout, callbacks=[callback],
                               catch=(Exception,), gc_after_trial=False, show_progress_bar=False)

    t0 = time.perf_counter()
    all_records = [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)]
    # The front is Optuna's own (constraint-aware: only trials whose constraints are all <= 0).
    # `pareto_front` above recomputes it independently; the tests check that the two agree.
    front_ids = {t.number for t in study.best_trials}
    for r in all_records:
        r.on_front = r.number in front_ids
    front = [r for r in all_records if r.on_front]
    best = best_of(front)
    plan_files: dict[int, Path] = {}
    model = getattr(workload, "model", None)
    from autorank.plan import Plan

    for r in front:
        p = run_dir / "front" / f"trial_{r.number:04d}.yaml"
        Plan.from_dict(r.plan).save(p, model=model)
        plan_files[r.number] = p
    out_path = None
    if best is not None and export_path is not None:
        out_path = Plan.from_dict(best.plan).save(export_path, model=model)
    result = StudyResult(study_name=study_name, storage=storage, budget_bytes=budget,
                         trials=all_records, front=front, best=best, export_path=out_path,
                         n_new=n_new, plan_files=plan_files)
    split["log"] += time.perf_counter() - t0
    result.wall_s = time.perf_counter() - t_start
    result.time_split_s = split
    if tracker is not None:
        t0 = time.perf_counter()
        tracker.end_study(result, plan_files)
        split["log"] += time.perf_counter() - t0
    return result


def default_plan_meta(workload) -> dict[str, Any]:
    """What scripts/finetune_on_device.py needs to rebuild the model with torch alone: the model
    factory ('module:function', torch/torchvision only) and its kwargs."""
    spec = getattr(workload, "spec", None)
    if spec is None or not hasattr(spec, "key"):
        return {}
    k = spec.key()
    module, _, fn = k["factory"].rpartition(".")
    kwargs = dict(k.get("kwargs") or {})
    kwargs["num_classes"] = int(workload.num_classes)
    meta: dict[str, Any] = {"model": {"factory": f"{module}:{fn}", "kwargs": kwargs}}
    trainer = getattr(workload, "trainer", None)
    if trainer is not None:  # the device script fine-tunes as the search did
        meta["lr"] = float(trainer.lr)
        meta["seed"] = int(trainer.seed)
    return meta


def _set_attrs(trial, attrs: Mapping[str, Any]) -> None:
    trial.set_user_attr(RECORD_ATTR, {k: v for k, v in attrs.items() if v is not None})


def _device_dict(device) -> dict:
    d = {k: getattr(device, k) for k in ("name", "ram_mb", "reserved_mb", "gflops_fp32", "budget_mb")
         if hasattr(device, k)}
    d["budget_bytes"] = int(device.budget_bytes)
    return d


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(enabled: bool):
    from autorank.search.profile import _progress as p

    return p(enabled)
