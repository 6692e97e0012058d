"""The planners' report: report.md (a table per budget) and a figure per budget."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autorank.bench.planners.common import BUDGETS, PLANNERS, SEARCHES
from autorank.units import MB


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """2-D hypervolume of (accuracy: maximised, peak: minimised) points against `reference`
    (accuracy, peak): the area they dominate above its accuracy and below its peak. Optuna's only
    public hypervolume is plot_hypervolume_history (compute_hypervolume lives in the private
    optuna._hypervolume): the points as trials of an in-memory study, the history's last value."""
    import warnings

    import optuna
    from optuna.visualization import plot_hypervolume_history

    pts = [(float(a), float(p)) for a, p in points if a > reference[0] and p < reference[1]]
    if not pts:
        return 0.0
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([optuna.trial.create_trial(values=list(p)) for p in pts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        fig = plot_hypervolume_history(study, list(reference))
    return float(fig.data[0].y[-1])


def front_hypervolume(trials: Sequence[Mapping[str, Any]], budget_bytes: int) -> float:
    """The hypervolume of the feasible trials' (proxy accuracy, peak / budget) against
    (accuracy 0, the budget): 1.0 would be accuracy 1 at no memory."""
    pts = [(t["accuracy"], t["peak_bytes"] / budget_bytes) for t in trials
           if t["state"] == "complete" and t["peak_bytes"] <= budget_bytes]
    return hypervolume(pts, (0.0, 1.0))



# --- the report ---------------------------------------------------------------------------------
def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "results").glob("*/*/seed*.json"))]


def planner_order(name: str) -> tuple[int, str]:
    head = name.split()[0]
    return (PLANNERS.index(head) if head in PLANNERS else len(PLANNERS), name)


def reach(trials: Sequence[Mapping[str, Any]], target: float) -> tuple[int, float] | None:
    """(trials run, their summed wall seconds) up to the first complete trial whose proxy
    accuracy reaches `target`; None when none does."""
    wall = 0.0
    for i, t in enumerate(sorted(trials, key=lambda t: t["number"])):
        wall += t["wall_s"]
        if t["state"] == "complete" and t["accuracy"] is not None and t["accuracy"] >= target:
            return i + 1, wall
    return None


def _mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def summary_rows(results: Sequence[Mapping[str, Any]], budget: str) -> list[list[str]]:
    """One row per planner at `budget` (module doc: report.md)."""
    runs = [r for r in results if r["budget"] == budget]
    target = {r["seed"]: r["proxy_accuracy"] for r in runs if r["planner"] == "knapsack" and r.get("feasible")}
    rows = []
    for planner in sorted({r["planner"] for r in runs}, key=planner_order):
        mine = sorted((r for r in runs if r["planner"] == planner), key=lambda r: r["seed"])
        ok = [r for r in mine if r.get("feasible")]
        hits = [reach(r["trials"], target[r["seed"]]) if r["seed"] in target else None for r in mine]
        rows.append([planner, str(len(mine)) + ("" if len(ok) == len(mine) else f" ({len(mine) - len(ok)} nothing fits)"),
                     _mean_std([r.get("refit_accuracy") for r in ok]), _mean_std([r.get("long_accuracy") for r in ok]),
                     _mean_std([r["predicted_peak_bytes"] / MB for r in ok], 1),
                     _mean_std([r["hypervolume"] for r in mine]),
                     ", ".join("-" if h is None else str(h[0]) for h in hits),
                     ", ".join("-" if h is None else f"{h[1]:.0f}" for h in hits),
                     _mean_std([r["cpu_s"] for r in mine], 0), _mean_std([r["wall_s"] for r in mine], 0)])
    return rows


COLUMNS = ("planner", "seeds", "refit acc", "long refit acc", "peak MB", "hypervolume",
           "trials to knapsack", "trial wall s to knapsack", "CPU s", "wall s")


def report_text(results: Sequence[Mapping[str, Any]], budgets: Mapping[str, Mapping]) -> str:
    """report.md: a table per budget and what its columns mean."""
    first = results[0] if results else {}
    lines = ["# Planners at the same budget", "",
             f"Trials per study {max((len(r['trials']) for r in results), default=0)}, trial steps "
             f"{first.get('trial_steps')}, refit steps {first.get('refit_steps')}; seeds "
             f"{sorted({r['seed'] for r in results})}.", ""]
    for budget in [b for b in BUDGETS if b in budgets] + sorted(set(budgets) - set(BUDGETS)):
        b = budgets[budget]
        lines += [f"## {budget}: {b['bytes'] / MB:.2f} MB", "", b["why"], "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in summary_rows(results, budget)]
        lines += ["", f"![{budget}](figures/{budget}.png)", ""]
    lines += [
        "refit acc: the exported plan's validation accuracy after trainer.steps SGD steps (mean ± std over "
        "seeds); long refit acc: the same plan after long-factor times as many. peak MB: its predicted peak "
        "training memory. hypervolume: of the feasible trials' (proxy accuracy, peak / budget) against the "
        "reference point (accuracy 0, peak = the budget); 1 would be accuracy 1 at no memory. trials to "
        "knapsack, per seed: trials run (in trial order, infeasible ones included) until one's proxy accuracy "
        "reached the knapsack plan's at the same trial steps and seed ('-': never); trial wall s: those "
        "trials' summed wall time (profile and refits not included). CPU s, wall s: the whole planner per "
        "run (its fine-tunes, profile from cache, study, refits, long refit), mean over seeds.", ""]
    return "\n".join(lines)


def plot_budget(results: Sequence[Mapping[str, Any]], budget: str, budget_bytes: int, path: Path) -> Path:
    """Refit accuracy against predicted peak (a marker per planner and seed), and the best proxy
    accuracy so far against trials (the studies; the knapsack plan's proxy dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autorank.io import atomic_write

    runs = [r for r in results if r["budget"] == budget]
    names = sorted({r["planner"] for r in runs}, key=planner_order)
    colors = plt.get_cmap("tab20")
    markers = "os^vD<>pP*Xhd8H"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, name in enumerate(names):
        mine = [r for r in runs if r["planner"] == name and r.get("feasible")]
        ax1.scatter([r["predicted_peak_bytes"] / MB for r in mine], [r["refit_accuracy"] for r in mine],
                    marker=markers[i % len(markers)], color=colors(i % 20), label=name)
        for r in mine if name in SEARCHES else []:
            best, ys = 0.0, []
            for t in sorted(r["trials"], key=lambda t: t["number"]):
                best = max(best, t["accuracy"] or 0.0) if t["state"] == "complete" else best
                ys.append(best)
            ax2.plot(range(1, len(ys) + 1), ys, color=colors(i % 20), label=f"{name} seed {r['seed']}")
        if name == "knapsack":
            for r in mine:
                ax2.axhline(r["proxy_accuracy"], color=colors(i % 20), ls="--", label=f"knapsack seed {r['seed']}")
    ax1.axvline(budget_bytes / MB, color="grey", ls=":", label="budget")
    ax1.set(xlabel="predicted peak training memory (MB)", ylabel="refit accuracy", title=f"{budget}: exported plans")
    ax2.set(xlabel="trials", ylabel="best proxy accuracy so far", title=f"{budget}: studies")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def write_report(out: Path) -> Path:
    from autorank.io import atomic_write

    out = Path(out)
    results = load_results(out)
    budgets = json.loads((out / "budgets.json").read_text()) if (out / "budgets.json").is_file() else {}
    budgets = {b: v for b, v in budgets.items() if any(r["budget"] == b for r in results)}
    for budget, b in budgets.items():
        plot_budget(results, budget, b["bytes"], out / "figures" / f"{budget}.png")
    text = report_text(results, budgets)
    return atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))




EXPERIMENT = "autorank-bench-planners"


def log_report(out: Path, uri: str) -> str:
    """One MLflow run (experiment EXPERIMENT, named after the output folder) holding report.md,
    figures/ and each planner's mean refit accuracy per budget (metric refit_acc.<budget>.<planner>);
    returns its run id."""
    import mlflow

    from autorank.bench.planners.common import slug

    out = Path(out)
    results = load_results(out)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name=out.name, tags={"autorank.kind": "bench planners"})
    rid = run.info.run_id
    first = results[0] if results else {}
    for k in ("trial_steps", "refit_steps"):
        client.log_param(rid, k, first.get(k))
    client.log_param(rid, "seeds", sorted({r["seed"] for r in results}))
    for (budget, planner), accs in _refit_accuracies(results).items():
        client.log_metric(rid, f"refit_acc.{budget}.{slug(planner)}", statistics.mean(accs))
    client.log_artifact(rid, str(out / "report.md"))
    if (out / "figures").is_dir():
        client.log_artifacts(rid, str(out / "figures"), "figures")
    client.set_terminated(rid)
    return rid


def _refit_accuracies(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.get("feasible") and r.get("refit_accuracy") is not None:
            out.setdefault((r["budget"], r["planner"]), []).append(float(r["refit_accuracy"]))
    return out
