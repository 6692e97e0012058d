"""The front as a table (CSV, JSON) and plots (plotly HTML, matplotlib PNG) of accuracy against
predicted peak memory (MB), coloured by training FLOPs, infeasible trials greyed, budget line."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from autorank.plan.plan import atomic_write  # torch + yaml only: one atomic-write helper
from autorank.units import MB

COLUMNS = ("trial", "state", "on_front", "val_accuracy", "peak_mb", "predicted_peak_bytes",
           "predicted_activation_bytes", "measured_activation_bytes", "train_flops", "step_time_s",
           "wall_s", "source", "choices")


def rows(records: Sequence) -> list[dict]:
    out = []
    for r in records:
        out.append({
            "trial": r.number, "state": r.state, "on_front": bool(r.on_front),
            "val_accuracy": r.val_accuracy, "peak_mb": r.peak_mb,
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


def _split(records):
    plotted = [r for r in records if r.predicted_peak_bytes is not None and r.state in
               ("complete", "infeasible")]
    return ([r for r in plotted if r.state == "complete"],
            [r for r in plotted if r.state == "infeasible"])


def plot_html(records: Sequence, budget_bytes: int, path: Path, title: str = "") -> None:
    import plotly.graph_objects as go

    ok, bad = _split(records)
    fig = go.Figure()
    text = lambda rs: [f"trial {r.number} ({r.state}{', front' if r.on_front else ''})<br>" +
                       "<br>".join(f"{k}: {v}" for k, v in r.choices.items() if v != "frozen")
                       for r in rs]
    fig.add_trace(go.Scatter(
        x=[r.peak_mb for r in bad], y=[0.0] * len(bad), mode="markers", name="infeasible (not trained)",
        marker=dict(color="lightgrey", symbol="x", size=8), text=text(bad), hoverinfo="text+x"))
    fig.add_trace(go.Scatter(
        x=[r.peak_mb for r in ok], y=[r.val_accuracy for r in ok], mode="markers", name="feasible",
        marker=dict(color=[r.flops / 1e9 for r in ok], colorscale="Viridis", size=[13 if r.on_front
                    else 8 for r in ok], showscale=True, colorbar=dict(title="GFLOPs/step"),
                    line=dict(width=[2 if r.on_front else 0 for r in ok], color="red")),
        text=text(ok), hoverinfo="text+x+y"))
    front = sorted((r for r in ok if r.on_front), key=lambda r: r.peak_mb)
    fig.add_trace(go.Scatter(x=[r.peak_mb for r in front], y=[r.val_accuracy for r in front],
                             mode="lines", name="front", line=dict(color="red", dash="dot")))
    fig.add_vline(x=budget_bytes / MB, line_dash="dash", line_color="black",
                  annotation_text=f"budget {budget_bytes / MB:.1f} MB")
    fig.update_layout(title=title or "accuracy vs predicted peak training memory",
                      xaxis_title="predicted peak training memory (MB)",
                      yaxis_title="validation accuracy")
    atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs="cdn"))


def plot_png(records: Sequence, budget_bytes: int, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok, bad = _split(records)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if bad:
        ax.scatter([r.peak_mb for r in bad], [0.0] * len(bad), c="lightgrey", marker="x",
                   label="infeasible (not trained)")
    if ok:
        sc = ax.scatter([r.peak_mb for r in ok], [r.val_accuracy for r in ok],
                        c=[r.flops / 1e9 for r in ok], cmap="viridis",
                        s=[60 if r.on_front else 25 for r in ok],
                        edgecolors=["red" if r.on_front else "none" for r in ok], label="feasible")
        fig.colorbar(sc, ax=ax, label="GFLOPs / training step")
        front = sorted((r for r in ok if r.on_front), key=lambda r: r.peak_mb)
        ax.plot([r.peak_mb for r in front], [r.val_accuracy for r in front], "r:", label="front")
    ax.axvline(budget_bytes / MB, color="k", ls="--", label=f"budget {budget_bytes / MB:.1f} MB")
    ax.set_xlabel("predicted peak training memory (MB)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or "accuracy vs peak memory")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
