"""Full-fidelity refits after the proxy search, and the reference points.

Trials train `trial_steps` SGD steps (a proxy that ranks plans); the plans a user may export are
refit at `steps` (trainer.steps: what the device runs): the feasible front's best `top` by proxy
accuracy, plus the best plain-only feasible plan (so the exported plan is compared with what a
user gets without shortcut layers, at the same fidelity). The export is chosen by refit accuracy.

Two reference points are refit too, once per study: the unconstrained plain reference (plain
backprop of every candidate, refit even when over the budget: then marked over budget and never
exported) and the head alone (only the last candidate trained).

Everything lands in the study's storage (user attrs REFIT_ATTR and REFERENCE_ATTR, keyed with
the step count), so a resumed study refits nothing it already refit at the same fidelity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from autorank.plan import Plan
from autorank.search.budget import is_exact, is_plain
from autorank.search.cost import CostModel
from autorank.search.profile import Profile
from autorank.search.progress import progress_bar
from autorank.search.protocols import Workload
from autorank.search.records import REFERENCE_ATTR, REFIT_ATTR, TrialRecord, best_of

PLAIN_REFERENCE = "plain reference"
HEAD_ALONE = "head alone"


def refit_candidates(records: Sequence[TrialRecord], top: int) -> list[TrialRecord]:
    """The feasible front's best `top` by proxy accuracy, then the best plain-only feasible trial
    and the best exact one (plain with blocks recomputed: what an engineer trains by hand), when
    not among them. Duplicate trials are left out: their original stands for them."""
    feasible = [r for r in records if r.feasible and r.duplicate_of is None]
    front = sorted((r for r in feasible if r.on_front),
                   key=lambda r: (-r.val_accuracy, r.predicted_peak_bytes, r.number))[:max(0, top)]
    for pick in (is_plain, is_exact):
        best = best_of([r for r in feasible if pick(r.choices)])
        if best is not None and best.number not in {r.number for r in front}:
            front.append(best)
    return front


def _fit(workload: Workload, plan: Plan, steps: int, hparams: Mapping[str, float]) -> dict[str, Any]:
    """One refit; its result holds the fine-tuning settings it ran (`finetune`), which the plan
    file of a refit trial records (planfile.record_meta)."""
    settings = workload.finetune_settings(max_steps=steps, **hparams)
    res = workload.finetune(plan, settings, progress=False)
    return {"accuracy": float(res.val_accuracy), "val_loss": float(res.val_loss), "steps": int(steps),
            "seed": int(settings.seed), "hparams": dict(hparams), "finetune": settings.to_dict(),
            # > 0: the run went on from the trial's state at that step (exact: workload/resume.py)
            "continued_from": int((getattr(res, "extra", None) or {}).get("continued_from", 0))}


def refit_trials(study: optuna.Study, workload: Workload, records: Sequence[TrialRecord], *,
                 steps: int, top: int, on_done: Callable[[], None] | None = None) -> dict[int, dict]:
    """Refit refit_candidates(records, top) at `steps` SGD steps with each trial's hparams;
    results merged into the study's REFIT_ATTR (re-read and written after each refit: an
    interrupted refit keeps what it finished, and workers sharing the study keep each other's)
    and returned as {trial number: result}. on_done() after each candidate, refit now or before."""
    def stored() -> dict[str, dict]:  # read again each time: another worker may have stored some
        return {str(k): v for k, v in (study.user_attrs.get(REFIT_ATTR) or {}).items()}

    done = stored()
    for rec in refit_candidates(records, top):
        done = {**done, **stored()}
        prev = done.get(str(rec.number))
        if prev is None or prev.get("steps") != steps or not prev.get("finetune"):
            res = _fit(workload, Plan.from_dict(dict(rec.plan)), steps, rec.hparams)
            done = {**done, **stored(), str(rec.number): res}
            study.set_user_attr(REFIT_ATTR, done)
        if on_done is not None:
            on_done()
    return {int(k): v for k, v in done.items()}


def reference_choices(profile: Profile) -> dict[str, dict[str, str]]:
    """The reference plans as choices: plain backprop of every candidate, and the head alone
    (blocks offered for recomputation kept as they are: plain training)."""
    names, kept = profile.candidate_names, {b: "frozen" for b in profile.block_names}
    return {PLAIN_REFERENCE: {n: "full" for n in names} | kept,
            HEAD_ALONE: {n: ("full" if n == names[-1] else "frozen") for n in names} | kept}


def refit_references(study: optuna.Study, workload: Workload, profile: Profile, cost: CostModel, *,
                     budget_bytes: int, steps: int, hparams: Mapping[str, float],
                     plan_meta: Mapping[str, Any] | None = None,
                     on_done: Callable[[], None] | None = None) -> dict[str, dict]:
    """The reference points refit at `steps` with `hparams` (the warm-start values), cached in
    the study's REFERENCE_ATTR: {name: {choices, accuracy, steps, seed, hparams, peak_bytes,
    over_budget}}. on_done() after each point, refit now or before."""
    refs = dict(study.user_attrs.get(REFERENCE_ATTR) or {})
    for name, choices in reference_choices(profile).items():
        if (refs.get(name) or {}).get("steps") != steps:
            plan = profile.to_plan(choices, meta=dict(plan_meta or {}))
            peak = int(cost.peak(choices).total_bytes)
            refs[name] = {"choices": choices, "peak_bytes": peak, "over_budget": peak > budget_bytes,
                          "flops": int(cost.flops(choices)), **_fit(workload, plan, steps, hparams)}
            study.set_user_attr(REFERENCE_ATTR, refs)
        if on_done is not None:
            on_done()
    return refs


def refit_phase(study: optuna.Study, workload: Workload, records: Sequence[TrialRecord], profile: Profile,
                cost: CostModel, *, steps: int, top: int, references: bool, budget_bytes: int,
                hparams: Mapping[str, float], plan_meta: Mapping[str, Any] | None = None,
                progress: bool = True) -> dict[str, dict]:
    """The search's refit phase under one progress bar, "refitting N plans at S steps", one tick
    per plan (a plan refit before at the same steps ticks at once): refit_trials(records, top),
    then, when `references`, refit_references. Returns the references ({} without them)."""
    n = len(refit_candidates(records, top)) + (len(reference_choices(profile)) if references else 0)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"refitting {n} plans at {steps} steps", total=n)
        tick = lambda: bar.advance(task)  # noqa: E731
        refit_trials(study, workload, records, steps=steps, top=top, on_done=tick)
        if not references:
            return {}
        return refit_references(study, workload, profile, cost, budget_bytes=budget_bytes, steps=steps,
                                hparams=hparams, plan_meta=plan_meta, on_done=tick)
