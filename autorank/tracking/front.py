"""The front as a table (CSV, JSON) and plots (plotly HTML, matplotlib PNG).

The plots are Optuna's own `plot_pareto_front` (it reads the stored constraints: infeasible trials
in grey, the constraint-aware front of all three objectives highlighted), shown as accuracy
against predicted peak memory; on top, only what it lacks: the device budget as a line and the
reference points (the warm-start plans: the paper's knapsack plan, plain backprop, uniform levels)
labelled by their source.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from autorank.io import atomic_write
from autorank.units import MB

COLUMNS = ("trial", "state", "on_front", "val_accuracy", "refit_accuracy", "steps", "refit_steps",
           "hparams", "peak_mb", "predicted_peak_bytes",
           "predicted_activation_bytes", "measured_activation_bytes", "train_flops", "step_time_s",
           "wall_s", "source", "choices")
TARGET_NAMES = ["predicted peak training memory (MB)", "validation accuracy"]


def rows(records: Sequence) -> list[dict]:
    out = []
    for r in records:
        out.append({
            "trial": r.number, "state": r.state, "on_front": bool(r.on_front),
            "val_accuracy": r.val_accuracy, "refit_accuracy": r.refit_accuracy, "steps": r.steps,
            "refit_steps": r.refit_steps,
            "hparams": " ".join(f"{k}={v:.4g}" for k, v in sorted(r.hparams.items())),
            "peak_mb": r.peak_mb,
            "predicted_peak_bytes": r.predicted_peak_bytes,
            "predicted_activation_bytes": r.predicted_activation_bytes,
            "measured_activation_bytes": r.measured_activation_bytes, "train_flops": r.flops,
            "step_time_s": r.step_time_s, "wall_s": r.wall_s, "source": r.source,
            "choices": " ".join(f"{k}={v}" for k, v in r.choices.items() if v != "frozen")})
    return out


def write_table(records: Sequence, csv_path: Path, json_path: Path) -> None:
    """front.csv and front.json, each written atomically (a reader never sees half a file)."""
    data = rows(records)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            w.writerows(data)

    atomic_write(csv_path, write_csv)
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def memory_and_accuracy(t: FrozenTrial) -> tuple[float, float]:
    """The plotted targets: (peak MB, accuracy) of the study's (accuracy, peak MB, FLOPs)."""
    return t.values[1], t.values[0]


def reference_points(records: Sequence) -> list[tuple[str, float, float]]:
    """(label, peak MB, accuracy) of the warm-start trials that have figures."""
    return [(r.source, r.peak_mb, r.val_accuracy) for r in records
            if r.source and r.state in ("complete", "infeasible") and r.peak_mb is not None]


def refit_points(references: Mapping[str, Mapping]) -> list[tuple[str, float, float]]:
    """(label, peak MB, refit accuracy) of the refit reference points (plain reference, head
    alone): the label says `over budget` where it does not fit."""
    return [(name + (" (over budget)" if r.get("over_budget") else ""), r["peak_bytes"] / MB,
             r["accuracy"]) for name, r in references.items()]


def plot_html(study: optuna.Study, records: Sequence, budget_bytes: int, path: Path,
              title: str = "", references: Mapping[str, Mapping] | None = None) -> None:
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_pareto_front(study, targets=memory_and_accuracy,
                                                 target_names=TARGET_NAMES)
    refs = reference_points(records)
    fig.add_trace(go.Scatter(x=[x for _, x, _ in refs], y=[y for *_, y in refs], text=[s for s, *_ in refs],
                             mode="markers+text", textposition="top center", name="reference plans",
                             marker=dict(symbol="diamond-open", size=14, color="black")))
    refit = refit_points(references or {})
    if refit:
        fig.add_trace(go.Scatter(x=[x for _, x, _ in refit], y=[y for *_, y in refit],
                                 text=[s for s, *_ in refit], mode="markers+text",
                                 textposition="bottom center", name="references (refit)",
                                 marker=dict(symbol="star", size=14, color="crimson")))
    fig.add_vline(x=budget_bytes / MB, line_dash="dash", line_color="black",
                  annotation_text=f"budget {budget_bytes / MB:.1f} MB")
    fig.update_layout(title=title or "accuracy vs predicted peak training memory")
    atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs="cdn"))


def plot_png(study: optuna.Study, records: Sequence, budget_bytes: int, path: Path,
             title: str = "", references: Mapping[str, Mapping] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            study, targets=memory_and_accuracy, target_names=TARGET_NAMES)
    fig = ax.figure
    refs = reference_points(records)
    ax.scatter([x for _, x, _ in refs], [y for *_, y in refs], marker="D", facecolors="none",
               edgecolors="black", s=70, label="reference plans")
    for label, x, y in refs:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    refit = refit_points(references or {})
    if refit:
        ax.scatter([x for _, x, _ in refit], [y for *_, y in refit], marker="*", color="crimson", s=120,
                   label="references (refit)")
        for label, x, y in refit:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.axvline(budget_bytes / MB, color="k", ls="--", label=f"budget {budget_bytes / MB:.1f} MB")
    ax.set_title(title or "accuracy vs peak memory")
    ax.legend(loc="best", fontsize=8)
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png",
                                                   dpi=110))
    finally:
        plt.close(fig)
