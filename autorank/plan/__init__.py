"""Plans: per-layer training choices, the plan file, and applying them to a model (torch + yaml)."""

from autorank.plan.apply import (
    applied_plan,
    apply_plan,
    candidate_layers,
    finetune_mode,
    remove_plan,
    trained_region,
)
from autorank.plan.plan import Choice, Plan, check_fingerprint, model_fingerprint

__all__ = [
    "Choice",
    "Plan",
    "apply_plan",
    "applied_plan",
    "candidate_layers",
    "check_fingerprint",
    "finetune_mode",
    "model_fingerprint",
    "remove_plan",
    "trained_region",
]
