"""Plans: per-layer training choices, the plan file, and applying them to a model (torch + yaml)."""

from autorank.plan.apply import (
    applied_plan,
    apply_plan,
    candidate_layers,
    check_choices,
    finetune_mode,
    remove_plan,
    trained_region,
)
from autorank.errors import PlanError
from autorank.plan.plan import Choice, Plan, atomic_write, check_fingerprint, model_fingerprint, original_modules
from autorank.plan.weights import (build_model_from_factory, classifier_head, load_base_weights, read_weights_file,
                                   save_base_weights)

__all__ = [
    "Choice",
    "PlanError",
    "Plan",
    "apply_plan",
    "applied_plan",
    "build_model_from_factory",
    "atomic_write",
    "candidate_layers",
    "check_choices",
    "check_fingerprint",
    "classifier_head",
    "finetune_mode",
    "load_base_weights",
    "model_fingerprint",
    "original_modules",
    "read_weights_file",
    "remove_plan",
    "save_base_weights",
    "trained_region",
]
