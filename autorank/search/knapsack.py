"""The paper's knapsack over per-layer choices, with exact integer bytes and the budget on
predicted PEAK training memory.

One choice per candidate layer; minimise the summed sensitivity; total <= budget. The dynamic
program keeps, layer by layer, the Pareto set of (bytes, sensitivity) partial plans: bytes stay
exact Python ints (no bucketing that could break the budget) and the result is the exact optimum
of the additive model.

Peak memory is not additive: the trained region starts at the earliest non-frozen layer (its BN /
activation companions cost bytes whatever the choices), and the transient is a max. So:
  1. enumerate the region start s (the first non-frozen candidate layer);
  2. per start, additive costs from differential predictions (Profile.alone_peak_bytes,
     with_first_peak_bytes): cost = peak({s: c_s}) + sum_{j>s} peak({first: full, j: c_j}) - ref;
  3. solve each DP, merge the Pareto candidates of all starts, sorted by sensitivity;
  4. verify candidates with the full predictor in that order; the first within budget wins.
The returned plan is therefore never over budget by the predictor's own figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from autorank.errors import ConfigError
from autorank.search.cost import peak_parts
from autorank.search.profile import Profile
from autorank.units import MB


class BudgetTooSmall(ConfigError):
    """The budget is below the smallest possible plan; `min_peak_bytes` says what that is."""

    def __init__(self, budget_bytes: int, min_peak_bytes: int, min_choices: Mapping[str, str]):
        self.budget_bytes, self.min_peak_bytes = budget_bytes, min_peak_bytes
        self.min_choices = dict(min_choices)
        trained = {k: v for k, v in min_choices.items() if v != "frozen"}
        super().__init__(
            f"memory budget {budget_bytes / MB:.2f} MB is below the smallest possible plan: "
            f"{min_peak_bytes / MB:.2f} MB predicted peak training memory (training {trained}). "
            f"Raise the budget to at least that: device.budget_mb={math.ceil(min_peak_bytes / MB * 100) / 100:.2f} "
            f"(or use a smaller data.batch_size / data.input_size).")


@dataclass
class KnapsackResult:
    choices: dict[str, str]  # layer -> choice key
    sensitivity: float
    predicted_peak_bytes: int
    additive_bytes: int  # the DP's own estimate for the winner
    budget_bytes: int
    min_peak_bytes: int
    n_verified: int = 0
    plan: object = None  # a Plan, when built from a Profile with autorank.plan available
    meta: dict = field(default_factory=dict)


def solve(items: Sequence[Sequence[tuple[int, float]]], budget: int
          ) -> tuple[list[tuple[int, float, tuple[int, ...]]], int]:
    """Exact multiple-choice knapsack. items[l] = [(bytes, sensitivity) per choice of layer l].

    Returns the Pareto set of complete plans within budget as (bytes, sensitivity, choice
    indices), sorted by bytes (sensitivity strictly decreasing), and the number of states kept.
    The optimum is its last entry. Costs may be negative (differential costs).
    """
    min_rest = [0] * (len(items) + 1)
    for i in range(len(items) - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + min(int(c) for c, _ in items[i])
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    peak_states = 1
    for i, choices in enumerate(items):
        nxt = [(b + int(c), s + float(v), idx + (k,))
               for b, s, idx in states for k, (c, v) in enumerate(choices)
               if b + int(c) + min_rest[i + 1] <= budget]
        nxt.sort(key=lambda t: (t[0], t[1], t[2]))
        states = []
        for st in nxt:  # keep the Pareto set: more bytes only for strictly less sensitivity
            if not states or st[1] < states[-1][1]:
                states.append(st)
        peak_states = max(peak_states, len(states))
    return states, peak_states


def _start_items(prof: Profile, s: int) -> list[list[tuple[str, int, float, int]]]:
    """Per layer: (choice, additive non-transient bytes, sensitivity, transient bytes) when the
    trained region starts at layer s."""
    ref = prof.ref_peak_bytes - prof.ref_transient_bytes
    out = []
    for j, lp in enumerate(prof.layers):
        tr = lp.alone_transient_bytes or {c: 0 for c in lp.choices}
        if j < s:
            out.append([("frozen", 0, lp.sensitivity["frozen"], 0)])
        elif j == s:
            out.append([(c, lp.alone_peak_bytes[c] - tr[c], lp.sensitivity[c], tr[c])
                        for c in lp.choices if c != "frozen"])
        else:
            wtr = lp.with_first_transient_bytes or {c: 0 for c in lp.choices}
            out.append([(c, lp.with_first_peak_bytes[c] - wtr[c] - ref, lp.sensitivity[c],
                         0 if c == "frozen" else tr[c]) for c in lp.choices])
    return out


def knapsack(prof: Profile, budget_bytes: int, peak_fn: Callable[[Mapping[str, str]], object] | None = None,
             *, max_verify: int = 64) -> KnapsackResult:
    """Minimum summed sensitivity plan with predicted peak <= budget_bytes (see module doc).

    `peak_fn(choices)` is the full predictor used to verify (bytes, or a PeakMemory-like record);
    without it the additive model is trusted. The transient part of the peak is a max, not a sum:
    each DP runs under a transient cap T (choices whose transient exceeds T excluded, budget - T),
    for every distinct T. Raises BudgetTooSmall when no plan fits.
    """
    budget_bytes = int(budget_bytes)
    names = prof.layer_names
    if not names:
        raise ValueError("empty profile: the search space selects no layer")
    if any(not lp.alone_peak_bytes for lp in prof.layers):
        raise ValueError("profile has no peak-memory predictions: run fill_peak_bytes first")
    verified: dict[tuple[str, ...], int] = {}

    def true_peak(keys: tuple[str, ...], additive: int) -> int:
        if keys not in verified:
            verified[keys] = additive if peak_fn is None else peak_parts(
                peak_fn(dict(zip(names, keys))))[0]
        return verified[keys]

    best_est: dict[tuple[str, ...], tuple[float, int]] = {}
    cheapest: list[tuple[int, tuple[str, ...]]] = []
    for s in range(len(names)):
        if prof.layers[s].kind == "block":
            continue  # a recomputed block trains nothing: the region starts at a layer
        items = _start_items(prof, s)
        caps = sorted({t[3] for ch in items for t in ch if t[0] != "frozen"})
        for cap in caps:
            allowed = [[t for t in ch if t[3] <= cap] for ch in items]
            if any(not ch for ch in allowed):
                continue
            cheap = tuple(min(ch, key=lambda t: (t[1], t[2]))[0] for ch in allowed)
            cheapest.append((sum(min(t[1] for t in ch) for ch in allowed) + cap, cheap))
            pareto, _ = solve([[(b, v) for _, b, v, _ in ch] for ch in allowed], budget_bytes - cap)
            for b, v, idx in pareto:
                keys = tuple(allowed[j][k][0] for j, k in enumerate(idx))
                if keys not in best_est or b + cap < best_est[keys][1]:
                    best_est[keys] = (v, b + cap)
    candidates = sorted((v, b, k) for k, (v, b) in best_est.items())
    n = 0
    for v, b, keys in candidates[:max_verify]:
        n += 1
        peak = true_peak(keys, b)
        if peak <= budget_bytes:
            return _result(prof, keys, v, peak, b, budget_bytes, cheapest, true_peak, n)
    # Nothing verified within budget: the cheapest plans are the last resort.
    for b, keys in sorted(set(cheapest)):
        peak = true_peak(keys, b)
        if peak <= budget_bytes:
            v = sum(prof.layers[j].sensitivity[c] for j, c in enumerate(keys))
            return _result(prof, keys, v, peak, b, budget_bytes, cheapest, true_peak, n)
    min_peak, min_keys = min((true_peak(k, b), k) for b, k in cheapest)
    raise BudgetTooSmall(budget_bytes, min_peak, dict(zip(names, min_keys)))


def _result(prof, keys, sens, peak, additive, budget, cheapest, true_peak, n) -> KnapsackResult:
    min_peak = min(true_peak(k, b) for b, k in cheapest)
    return KnapsackResult(choices=dict(zip(prof.layer_names, keys)), sensitivity=float(sens),
                          predicted_peak_bytes=int(peak), additive_bytes=int(additive),
                          budget_bytes=budget, min_peak_bytes=int(min_peak), n_verified=n)


def check_budget(prof: Profile, budget_bytes: int,
                 peak_fn: Callable[[Mapping[str, str]], object] | None = None) -> None:
    """BudgetTooSmall (naming the smallest plan's predicted peak and the override to use) when no
    plan that trains a layer fits under budget_bytes: a study checks this before its first trial,
    instead of running a whole search of infeasible trials."""
    knapsack(prof, budget_bytes, peak_fn)


def min_peak_bytes(prof: Profile, peak_fn: Callable[[Mapping[str, str]], int] | None = None) -> int:
    """The smallest predicted peak of any plan that trains at least one layer."""
    try:
        knapsack(prof, -1, peak_fn)
    except BudgetTooSmall as e:
        return e.min_peak_bytes
    raise AssertionError("unreachable")
