"""Workload: device profiles, models, data, the base model and fine-tuning of one plan.

Imports lightning, torchvision and scikit-learn (lazily where it can); the torch-only core never
imports this package.
"""

from autorank.models import ModelSpec, split_at_first_trained
from autorank.workload.device import DeviceProfile
from autorank.workload.module import PlanModule, TrainingFailed
from autorank.workload.workload import FineTuneResult, Paths, TrainerConfig, Workload

__all__ = [
    "DeviceProfile",
    "FineTuneResult",
    "ModelSpec",
    "Paths",
    "PlanModule",
    "TrainerConfig",
    "TrainingFailed",
    "Workload",
    "split_at_first_trained",
]
