"""The budget curve as a table and a picture: best accuracy reachable under each memory budget,
plain-only plans against plans with ranks (autorank.search.budget.budget_curve over the study's
trials, no new training), with the device budget as a vertical line."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from autorank.io import atomic_write
from autorank.search.budget import BudgetPoint
from autorank.units import MB

COLUMNS = ("budget_mb", "budget_bytes", "plain_accuracy", "plain_trial", "any_accuracy", "any_trial", "gain",
           "exact_accuracy", "exact_trial")


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
