"""The plans a study tries first: the paper's knapsack plan and the baselines a user would try."""

from __future__ import annotations

import warnings

from autorank.search.cost import CostModel
from autorank.search.knapsack import BudgetTooSmall, knapsack
from autorank.search.profile import Profile
from autorank.search.space import level_key


def warm_start_plans(profile: Profile, budget_bytes: int, cost: CostModel) -> list[tuple[str, dict]]:
    """(source, choices) to enqueue first, without repeats: the knapsack plan; plain backprop of
    every candidate (recorded infeasible from its prediction when it does not fit, never trained);
    uniform-level plans at the lowest, middle and highest ASI level (each trains every candidate,
    the expensive kind of trial, so not all levels); and the plainly trained last k candidates
    for the deepest k that fits (the plain plan a plan with ranks has to beat), k = 2 and k = N/2."""
    names = profile.layer_names
    out: list[tuple[str, dict]] = []

    def rest(n: str) -> str:  # a layer a uniform plan leaves out: frozen, or `full` (the head rule)
        cs = profile.layer(n).choices
        return "frozen" if "frozen" in cs else ("full" if "full" in cs else cs[0])

    try:
        out.append(("knapsack", knapsack(profile, budget_bytes, cost.peak).choices))
    except BudgetTooSmall as e:
        warnings.warn(f"no knapsack warm start: {e}", stacklevel=2)
    if all("full" in profile.layer(n).choices for n in names):
        out.append(("full every candidate", {n: "full" for n in names}))
    levels = sorted(profile.space.get("levels", []))
    for lv in sorted({levels[0], levels[len(levels) // 2], levels[-1]} if levels else set()):
        # the batch mode kept whole where the space offers it: measured to hold plain accuracy
        # where compressing every mode lost 5 points (docs/BENCHMARKS.md)
        key = level_key(lv, keep_batch=True)
        if not any(key in profile.layer(n).choices for n in names):
            key = level_key(lv)
        ch = {n: key for n in names if key in profile.layer(n).choices}
        if ch:
            out.append((f"uniform {key}", {n: ch.get(n, rest(n)) for n in names}))
    def plain_last(k: int) -> dict | None:  # the last k candidates plainly, when the space allows it
        ch = {n: ("full" if i >= len(names) - k else "frozen") for i, n in enumerate(names)}
        return ch if all(c in profile.layer(n).choices for n, c in ch.items()) else None

    fits = {}
    for k in range(len(names), 0, -1):  # the deepest plain plan that fits: the one to beat
        ch = plain_last(k)
        if ch is not None and cost.peak(ch).total_bytes <= budget_bytes:
            fits[k] = ch
            break
    for k in sorted({2, len(names) // 2} & set(range(1, len(names) + 1))):
        ch = plain_last(k)
        if ch is not None and k not in fits and cost.peak(ch).total_bytes <= budget_bytes:
            fits[k] = ch
    out.extend((f"full last {k}", ch) for k, ch in sorted(fits.items()))
    # plainly trained last layers: a few depths, not every one (each is a trial the sampler does not get)
    seen, uniq = set(), []
    for src, ch in out:
        k = tuple(ch[n] for n in names)
        if k not in seen:
            seen.add(k)
            uniq.append((src, ch))
    return uniq
