"""Search: layer profile, the paper's knapsack planner, and the multi-objective Optuna study."""

from autorank.search.knapsack import BudgetTooSmall, KnapsackResult, knapsack, min_peak_bytes
from autorank.search.profile import Profile, profile_layers, profile_workload
from autorank.search.space import SearchSpace, load_space

__all__ = ["BudgetTooSmall", "KnapsackResult", "Profile", "SearchSpace", "knapsack", "load_space",
           "min_peak_bytes", "profile_layers", "profile_workload"]
