"""Search: layer profile, the paper's knapsack planner, and the multi-objective Optuna study."""

from autorank.search.knapsack import BudgetTooSmall, KnapsackResult, knapsack, min_peak_bytes
from autorank.search.profile import Profile, profile_layers, profile_workload
from autorank.search.space import SearchSpace, load_space

__all__ = ["BudgetTooSmall", "KnapsackResult", "Profile", "SearchSpace", "knapsack", "load_space",
           "min_peak_bytes", "profile_layers", "profile_workload"]

from autorank.search.runners import KnapsackRun, KnapsackSearch, OptunaSearch, run_knapsack  # noqa: E402
from autorank.search.study import StudyResult, TrialRecord, run_study  # noqa: E402

__all__ += ["KnapsackRun", "KnapsackSearch", "OptunaSearch", "StudyResult", "TrialRecord",
            "run_knapsack", "run_study"]
