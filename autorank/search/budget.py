"""What the budget costs: best accuracy reachable under each memory budget, from the study's trials.

For a budget b, the best plan is the trial with the highest accuracy among the complete trials
whose predicted peak training memory is <= b. Three curves answer "what do ranks buy on my
device": `plain` (plans of frozen / plainly trained layers only: what a user gets without
autorank's shortcut layers), `exact` (plain plans and recomputed blocks: every method whose
gradients are plain training's, autorank.methods `Method.exact`; what recomputation buys is
`exact` over `plain`) and `any` (every plan, ASI included; never below the other two). No new training: the
curve reads the trials the study already ran. Trials over the study's own budget were never
trained (they have no accuracy), so the curve covers budgets up to the device budget; the plain
reference of an unconstrained run is a separate point (`reference`).

Pure Python over records with `choices`, `state`, `predicted_peak_bytes` and an accuracy
attribute (and the method registry for `exact`): no Optuna import, so the knapsack path and the
tracker can use it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from autorank.methods import is_exact_key


def is_plain(choices: Mapping[str, str]) -> bool:
    """A plan without shortcut layers: every candidate frozen or plainly trained."""
    return all(c in ("frozen", "full") for c in choices.values())


def is_exact(choices: Mapping[str, str]) -> bool:
    """A plan whose gradients are plain training's: frozen, full and recomputed blocks only."""
    return all(is_exact_key(c) for c in choices.values())


@dataclass(frozen=True)
class BudgetPoint:
    budget_bytes: int
    plain_accuracy: float | None  # best plain-only plan within the budget (None: none fits)
    plain_trial: int | None
    any_accuracy: float | None  # best plan of any kind within the budget
    any_trial: int | None
    exact_accuracy: float | None = None  # best plan of exact methods only (plain + recompute)
    exact_trial: int | None = None

    @property
    def gain(self) -> float | None:
        """Accuracy that ranks buy at this budget (any - plain); None where no plain plan fits."""
        if self.any_accuracy is None or self.plain_accuracy is None:
            return None
        return self.any_accuracy - self.plain_accuracy


def _accuracy(r, attr: str) -> float | None:
    v = getattr(r, attr, None)
    return None if v is None else float(v)


def budget_curve(records: Iterable, budgets: Sequence[int] | None = None, *,
                 accuracy: str | Callable = "val_accuracy") -> list[BudgetPoint]:
    """Best plain-only, best exact (plain + recompute) and best overall accuracy at each budget
    (bytes), ascending.

    `budgets`: None takes every distinct predicted peak of a complete trial (the curve's steps).
    `accuracy`: the record attribute to rank by (`val_accuracy`, the proxy; or a refit figure), or
    a function record -> float | None (None: the record is left out).
    """
    get = accuracy if callable(accuracy) else (lambda r: _accuracy(r, accuracy))
    done = []
    for r in records:
        acc = get(r) if getattr(r, "state", None) == "complete" else None
        if acc is not None and r.predicted_peak_bytes is not None:
            done.append((int(r.predicted_peak_bytes), -acc, int(r.number), is_plain(r.choices), acc,
                         is_exact(r.choices)))
    done.sort()
    if budgets is None:
        budgets = sorted({p for p, *_ in done})
    out: list[BudgetPoint] = []
    for b in sorted(int(x) for x in budgets):
        fit = [d for d in done if d[0] <= b]
        # best: highest accuracy; ties: less memory, then the earlier trial
        best_any = min(fit, key=lambda d: (d[1], d[0], d[2]), default=None)
        best_plain = min((d for d in fit if d[3]), key=lambda d: (d[1], d[0], d[2]), default=None)
        best_exact = min((d for d in fit if d[5]), key=lambda d: (d[1], d[0], d[2]), default=None)
        out.append(BudgetPoint(
            budget_bytes=b,
            plain_accuracy=None if best_plain is None else best_plain[4],
            plain_trial=None if best_plain is None else best_plain[2],
            any_accuracy=None if best_any is None else best_any[4],
            any_trial=None if best_any is None else best_any[2],
            exact_accuracy=None if best_exact is None else best_exact[4],
            exact_trial=None if best_exact is None else best_exact[2]))
    return out
