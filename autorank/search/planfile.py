"""The one way a plan leaves the search as a file: the study's front and best plan, the knapsack
planner's plan and `python -m autorank.export` all write a trial's plan through `export_record`
(record_meta: which accuracy and which step count the file carries), which writes with
`export_plan`."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from autorank.plan import Plan, build_model_from_factory, model_fingerprint
from autorank.plan.plan import FineTuneSettings

if TYPE_CHECKING:  # records imports Optuna; the knapsack planner runs without it
    from autorank.search.records import TrialRecord


def settings_model(plan: Plan) -> nn.Module | None:
    """The model the plan's fine-tuning settings name, built with torch alone, if it is one of
    autorank's own factories (a plan read from storage never makes us import other code); None
    when the plan names none or it cannot be built here (a warning says why)."""
    settings = FineTuneSettings.from_plan(plan)
    if settings is None:
        return None
    try:
        return build_model_from_factory(settings.model_factory, settings.model_kwargs, trusted_only=True)
    except Exception as e:  # not autorank's, not importable here, bad kwargs
        print(f"warning: the plan names model {settings.model_factory!r}, which cannot be built here "
              f"({e}); the plan keeps its own fingerprint, if any", file=sys.stderr)
        return None


def export_plan(plan: Plan | Mapping[str, Any], path: str | Path, model: nn.Module | None = None,
                *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write `plan` (a Plan or its dict) to `path` (YAML, or JSON by suffix; atomically), stamped
    with the fingerprint of `model`: the live base model when the caller has it, else the model
    its fine-tuning settings name (settings_model); with neither, the plan keeps the fingerprint it
    has. `meta` is merged into the plan's meta. Returns the path."""
    plan = Plan.from_dict(dict(plan)) if not isinstance(plan, Plan) else Plan.from_dict(plan.to_dict())
    if model is None:
        model = settings_model(plan)
        if model is not None and plan.fingerprint is not None and \
                plan.fingerprint.get("sha256") != model_fingerprint(model)["sha256"]:
            print("warning: the plan carries the fingerprint of another model than its fine-tuning "
                  "settings build; the exported plan takes the settings' model", file=sys.stderr)
    plan.meta.update(meta or {})
    return plan.save(path, model=model)


def record_meta(rec: TrialRecord) -> dict[str, Any]:
    """The plan-file meta of a stored trial (autorank.search.records.TrialRecord) beyond what
    its plan already holds: the trial's accuracy (`val_accuracy`, `val_loss`) and, where the trial
    was refit at full fidelity, the refit's (`refit_accuracy`, `refit_val_loss`) with the
    fine-tuning settings the refit ran (its step count), the run a device should repeat.
    `accuracy` is the accuracy of the run `finetune` describes and `accuracy_from` says which
    run that is: "refit" or "trial"."""
    meta: dict[str, Any] = {"val_accuracy": rec.val_accuracy}
    if rec.val_loss is not None:  # held-out cross-entropy (per token for a language model)
        meta["val_loss"] = rec.val_loss
    refit = rec.refit_accuracy is not None
    if refit:
        meta["refit_accuracy"] = rec.refit_accuracy
        if rec.refit_val_loss is not None:
            meta["refit_val_loss"] = rec.refit_val_loss
        if rec.refit_finetune:  # the settings the refit ran (refit.py), resolved by the workload
            meta["finetune"] = dict(rec.refit_finetune)
    meta["accuracy"] = rec.refit_accuracy if refit else rec.val_accuracy
    meta["accuracy_from"] = "refit" if refit else "trial"
    return meta


def export_record(rec: TrialRecord, path: str | Path, model: nn.Module | None = None, *,
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write the plan file of a stored trial: its plan with record_meta(rec), then `meta` (what
    the writer adds: where it was exported from, the device's process peak), through export_plan.
    The study's front and exported plan, the knapsack planner's plan and `python -m
    autorank.export` all write a trial's plan here, so the same trial gives the same file."""
    return export_plan(rec.plan, path, model, meta={**record_meta(rec), **(meta or {})})
