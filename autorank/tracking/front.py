"""The front as a table (CSV, JSON) and plots (plotly HTML, matplotlib PNG).

The plots are Optuna's own `plot_pareto_front` (it reads the stored constraints: infeasible trials
in grey, the constraint-aware front of all three objectives highlighted), shown as accuracy
against predicted peak memory; on top, only what it lacks: the device budget as a line and the
reference points (the warm-start plans: the paper's knapsack plan, plain backprop, uniform levels)
labelled by their source, placed so that no label covers another. A plan over the budget was
never trained: it has no accuracy, and is marked on the memory axis, not drawn at accuracy 0.
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
    """(label, peak MB, accuracy) of the warm-start trials that were trained."""
    return [(r.source, r.peak_mb, r.val_accuracy) for r in records
            if r.source and r.state == "complete" and r.peak_mb is not None]


def untrained_points(records: Sequence) -> list[tuple[str, float]]:
    """(label, peak MB) of the warm-start plans that were never trained (over the budget, or
    training nothing): they have a predicted peak and no accuracy, so they are marked on the
    memory axis, not drawn at accuracy 0."""
    return [(r.source, r.peak_mb) for r in records
            if r.source and r.state == "infeasible" and r.peak_mb is not None]


def refit_points(references: Mapping[str, Mapping]) -> list[tuple[str, float, float]]:
    """(label, peak MB, refit accuracy) of the refit reference points (plain reference, head
    alone): the label says `over budget` where it does not fit."""
    return [(name + (" (over budget)" if r.get("over_budget") else ""), r["peak_bytes"] / MB,
             r["accuracy"]) for name, r in references.items()]


def trained_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study holding only its trained trials, for Optuna's front plot:
    a trial over the budget (or training nothing) was never trained, and the accuracy 0.0 it
    returned to Optuna is no accuracy (untrained_points marks it on the memory axis instead)."""
    trained = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
               if all(v <= 0 for v in (t.constraints or {}).values())]
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(trained)
    return copy


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 gap: float = 4.0) -> list[tuple[float, float]]:
    """Offsets (dx, dy) of each label's lower-left corner from its anchor point, all in one unit
    (typographic points), so that no two labels' boxes overlap: greedy, in the given order, each
    label takes the first free place of right-above, right-below, left-above, left-below, then
    the same one line further out, and so on."""
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), (w, h) in zip(anchors, sizes):
        for k in range(4 * len(anchors) + 1):
            row = k // 4
            dx = gap if k % 4 in (0, 1) else -gap - w
            dy = gap + row * (h + gap) if k % 4 in (0, 2) else -gap - h - row * (h + gap)
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        out.append((dx, dy))
    return out


def plot_html(study: optuna.Study, records: Sequence, budget_bytes: int, path: Path,
              title: str = "", references: Mapping[str, Mapping] | None = None) -> None:
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_pareto_front(trained_study(study), targets=memory_and_accuracy,
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
    for label, x in untrained_points(records):  # never trained: on the memory axis, no accuracy
        fig.add_annotation(x=x, y=0, yref="paper", text=f"\u25b2 {label} (over budget: not trained)",
                           showarrow=False, yanchor="bottom", textangle=-90, font=dict(size=10, color="grey"))
    fig.add_vline(x=budget_bytes / MB, line_dash="dash", line_color="black",
                  annotation_text=f"budget {budget_bytes / MB:.1f} MB")
    fig.update_layout(title=title or "accuracy vs predicted peak training memory")
    atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs="cdn"))


def plot_png(study: optuna.Study, records: Sequence, budget_bytes: int, path: Path,
             title: str = "", references: Mapping[str, Mapping] | None = None) -> list[tuple[str, tuple]]:
    """front.png: Optuna's front of the trained trials, the warm-start plans (trained: at their
    accuracy; never trained: marked on the memory axis), the refit references and the budget.
    Returns each label's text and its drawn box (x0, y0, x1, y1) in display pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            trained_study(study), targets=memory_and_accuracy, target_names=TARGET_NAMES)
    fig = ax.figure
    refs = reference_points(records)
    ax.scatter([x for _, x, _ in refs], [y for *_, y in refs], marker="D", facecolors="none",
               edgecolors="black", s=70, label="reference plans")
    refit = refit_points(references or {})
    if refit:
        ax.scatter([x for _, x, _ in refit], [y for *_, y in refit], marker="*", color="crimson", s=120,
                   label="references (refit)")
    untrained = untrained_points(records)
    if untrained:  # at the bottom of the axes (axes y = 0), whatever the accuracy range
        ax.scatter([x for _, x in untrained], [0.0] * len(untrained), transform=ax.get_xaxis_transform(),
                   marker="^", color="grey", s=60, clip_on=False, label="over budget: not trained")
    ax.axvline(budget_bytes / MB, color="k", ls="--", label=f"budget {budget_bytes / MB:.1f} MB")
    ax.set_title(title or "accuracy vs peak memory")
    ax.legend(loc="best", fontsize=8)
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    labels = _annotate(ax, [(s, ax.transData.transform((x, y))) for s, x, y in refs + refit]
                       + [(s, ax.get_xaxis_transform().transform((x, 0.0))) for s, x in untrained])
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png",
                                                   dpi=fig.dpi))
        renderer = fig.canvas.get_renderer()
        return [(t.get_text(), tuple(t.get_window_extent(renderer).extents)) for t in labels]
    finally:
        plt.close(fig)


def _annotate(ax, points: Sequence[tuple[str, Sequence[float]]], fontsize: float = 7.0) -> list:
    """Label each point (display pixels) where no label covers another (place_labels)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    sizes = []
    for label, _ in points:  # measure each label as it will be drawn
        t = ax.text(0, 0, label, fontsize=fontsize)
        ext = t.get_window_extent(renderer)
        sizes.append((ext.width / px_per_pt, ext.height / px_per_pt))
        t.remove()
    anchors = [(float(xy[0]) / px_per_pt, float(xy[1]) / px_per_pt) for _, xy in points]
    out = []
    for (label, xy), (dx, dy) in zip(points, place_labels(anchors, sizes)):
        out.append(ax.annotate(label, xy, xycoords="figure pixels", textcoords="offset points",
                               xytext=(dx, dy), fontsize=fontsize, ha="left", va="bottom",
                               annotation_clip=False))
    return out
