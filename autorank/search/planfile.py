"""The one way a plan leaves the search as a file: the study's front and best plan, the knapsack
planner's plan and `python -m autorank.export` all write through `export_plan`."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from autorank.plan import Plan, build_model_from_factory, model_fingerprint
from autorank.plan.plan import FineTuneSettings


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
