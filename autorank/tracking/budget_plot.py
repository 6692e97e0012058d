"""The budget curve as a table and a picture: best accuracy reachable under each memory budget,
plain-only plans against plans with ranks (autorank.search.budget.budget_curve over the study's
trials, no new training), with the device budget as a vertical line."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from autorank.plan.plan import atomic_write  # torch + yaml only: one atomic-write helper
from autorank.search.budget import BudgetPoint, budget_curve
from autorank.units import MB

COLUMNS = ("budget_mb", "budget_bytes", "plain_accuracy", "plain_trial", "any_accuracy", "any_trial", "gain",
           "exact_accuracy", "exact_trial")


def study_budget_curve(records: Sequence, budget_bytes: int) -> list[BudgetPoint]:
    """The curve at every distinct predicted peak of a complete trial and at the device budget
    (proxy accuracy: every trained trial has one)."""
    peaks = {int(r.predicted_peak_bytes) for r in records
             if r.state == "complete" and r.predicted_peak_bytes is not None}
    return budget_curve(records, sorted(peaks | {int(budget_bytes)}))


def curve_rows(points: Sequence[BudgetPoint]) -> list[dict]:
    return [{"budget_mb": round(p.budget_bytes / MB, 3), "budget_bytes": p.budget_bytes,
             "plain_accuracy": p.plain_accuracy, "plain_trial": p.plain_trial,
             "any_accuracy": p.any_accuracy, "any_trial": p.any_trial, "gain": p.gain,
             "exact_accuracy": p.exact_accuracy, "exact_trial": p.exact_trial} for p in points]


def write_curve_csv(points: Sequence[BudgetPoint], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            w.writerows(curve_rows(points))

    atomic_write(Path(path), write)


def plot_curve_png(points: Sequence[BudgetPoint], budget_bytes: int, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    exact = any(p.exact_accuracy != p.plain_accuracy for p in points)  # a study that recomputed
    for attr, label, style in (("plain_accuracy", "plain backprop only", "C0--"),
                               *((("exact_accuracy", "plain + recomputed blocks", "C2-."),) if exact else ()),
                               ("any_accuracy", "with ASI ranks", "C1-")):
        xs = [p.budget_bytes / MB for p in points if getattr(p, attr) is not None]
        ys = [getattr(p, attr) for p in points if getattr(p, attr) is not None]
        ax.step(xs, ys, style, where="post", label=label, marker="o", ms=3)
    ax.axvline(budget_bytes / MB, color="k", ls=":", label=f"device budget {budget_bytes / MB:.1f} MB")
    ax.set_xlabel("memory budget (MB, predicted peak)")
    ax.set_ylabel("best validation accuracy (proxy)")
    ax.set_title(title or "best accuracy vs memory budget")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def summary_lines(points: Sequence[BudgetPoint], n: int = 5) -> list[str]:
    """A few points of the curve (evenly spread, the last always), one line each."""
    if not points:
        return []
    idx = sorted({round(i * (len(points) - 1) / max(n - 1, 1)) for i in range(min(n, len(points)))})

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    exact = any(p.exact_accuracy != p.plain_accuracy for p in points)  # a study that recomputed
    return [f"  {points[i].budget_bytes / MB:9.2f} MB: plain {f(points[i].plain_accuracy)}, "
            + (f"plain + recompute {f(points[i].exact_accuracy)}, " if exact else "")
            + f"with ranks {f(points[i].any_accuracy)}" for i in idx]
