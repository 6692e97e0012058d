"""Search: layer profile, the paper's knapsack planner, and the multi-objective Optuna study.

The names of the Optuna side (OptunaSearch, run_study)
are imported on first use, so that `autorank.search.KnapsackSearch` (conf/search/knapsack.yaml)
and the rest of the paper's planner run without Optuna installed.
"""

from importlib import import_module

from autorank.search.cost import PlanCost
from autorank.search.knapsack import BudgetTooSmall, KnapsackResult, knapsack, min_peak_bytes
from autorank.search.planfile import export_plan
from autorank.search.planner import KnapsackSearch, run_knapsack
from autorank.search.profile import Profile, profile_layers, profile_workload
from autorank.search.protocols import Workload
from autorank.search.records import TrialRecord
from autorank.search.result import SearchResult
from autorank.search.space import SearchSpace, load_space

_OPTUNA_SIDE = {"OptunaSearch": "autorank.search.study", "run_study": "autorank.search.study"}

__all__ = ["BudgetTooSmall", "KnapsackResult", "KnapsackSearch", "PlanCost",
           "Profile", "SearchResult", "SearchSpace", "TrialRecord", "Workload", "export_plan", "knapsack", "load_space",
           "min_peak_bytes", "profile_layers", "profile_workload", "run_knapsack", *_OPTUNA_SIDE]


def __getattr__(name: str):
    if name in _OPTUNA_SIDE:
        return getattr(import_module(_OPTUNA_SIDE[name]), name)
    raise AttributeError(f"module 'autorank.search' has no attribute {name!r}")
