"""The plans a study tries first: the paper's knapsack plan and the baselines a user would try."""

from __future__ import annotations

import warnings

from autorank.search.cost import CostModel
from autorank.search.knapsack import BudgetTooSmall, knapsack
from autorank.search.profile import Profile
from autorank.search.space import level_key


def warm_start_plans(profile: Profile, budget_bytes: int, cost: CostModel,
                     probe: dict[str, float] | None = None) -> list[tuple[str, dict]]:
    """(source, choices) to enqueue first, without repeats, most telling first (a study enqueues
    only the first n_trials // 2): the knapsack plan; plain backprop of every candidate (recorded
    infeasible from its prediction when it does not fit, never trained); the deepest plain plan
    that fits (the last k candidates plainly: the plain plan a plan with ranks has to beat); the
    uniform plan at the middle ASI level; the last 2 plainly; the uniform plans at the lowest and
    highest level (each trains every candidate, the expensive kind of trial); the last N/2. With
    blocks offered for recomputation (kept, `frozen`, in every other plan): the deepest plain plan
    that fits with every block recomputed, right after the deepest plain one. `probe` (searched
    hparams, e.g. {"lr": the top of the range}): the deepest exact plan (plain, recomputed where
    blocks are offered) once more at those values, right after it: what an engineer tunes by hand
    for the plan they would train, so the study holds it at both lrs (its hparams are the plan's,
    the rest take the warm-start values)."""
    names, blocks = profile.candidate_names, profile.block_names
    out: list[tuple[str, dict]] = []

    def rest(n: str) -> str:  # a layer a uniform plan leaves out: frozen, or `full` (the head rule)
        cs = profile.layer(n).choices
        return "frozen" if "frozen" in cs else ("full" if "full" in cs else cs[0])

    def uniform(lv: float) -> tuple[str, dict] | None:
        # the batch mode kept whole where the space offers it: measured to hold plain accuracy
        # where compressing every mode lost 5 points (docs/BENCHMARKS.md)
        key = level_key(lv, keep_batch=True)
        if not any(key in profile.layer(n).choices for n in names):
            key = level_key(lv)
        ch = {n: key for n in names if key in profile.layer(n).choices}
        return (f"uniform {key}", {n: ch.get(n, rest(n)) for n in names}) if ch else None

    def plain_last(k: int, recompute: bool = False) -> tuple[str, dict] | None:
        """The last k plainly (every block recomputed), if allowed and it fits."""
        ch = {n: ("full" if i >= len(names) - k else "frozen") for i, n in enumerate(names)}
        ch |= {b: "recompute" for b in blocks} if recompute else {}
        ok = k >= 1 and all(c in profile.layer(n).choices for n, c in ch.items())
        src = f"full last {k}" + (", blocks recomputed" if recompute else "")
        return (src, ch) if ok and cost.peak(ch).total_bytes <= budget_bytes else None

    try:
        out.append(("knapsack", knapsack(profile, budget_bytes, cost.peak).choices))
    except BudgetTooSmall as e:
        warnings.warn(f"no knapsack warm start: {e}", stacklevel=2)
    if all("full" in profile.layer(n).choices for n in names):
        out.append(("full every candidate", {n: "full" for n in names}))
    deepest = next((p for p in map(plain_last, range(len(names), 0, -1)) if p is not None), None)
    if blocks:
        deepest_rc = next((p for k in range(len(names), 0, -1) if (p := plain_last(k, True)) is not None), None)
        out.extend(p for p in (deepest, deepest_rc) if p is not None)
    levels = sorted(profile.space.get("levels", []))
    lows_highs = [uniform(lv) for lv in sorted({levels[0], levels[-1]} - {levels[len(levels) // 2]})] if levels else []
    exact = deepest_rc if blocks and deepest_rc is not None else deepest
    probed = None  # the deepest exact plan again at the probe's hparams, right after it
    if probe and exact is not None:
        probed = (f"{exact[0]}, " + ", ".join(f"{k} {v:g}" for k, v in probe.items()), exact[1] | probe)
    if blocks and probed is not None:
        out.append(probed)
    out.extend(p for p in (deepest, None if blocks else probed, uniform(levels[len(levels) // 2]) if levels else None,
                           plain_last(min(2, len(names))), *lows_highs, plain_last(len(names) // 2))
               if p is not None)
    seen, uniq = set(), []
    for src, ch in out:
        ch = {b: "frozen" for b in blocks} | ch  # a block a plan leaves out is kept as it is
        k = tuple(ch[n] for n in profile.layer_names) + tuple(sorted((h, ch[h]) for h in probe or {} if h in ch))
        if k not in seen:
            seen.add(k)
            uniq.append((src, ch))
    return uniq
