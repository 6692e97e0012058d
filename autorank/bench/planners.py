"""Does the search pay? Every way of choosing a plan, at the same budget and the same training.

    python -m autorank.bench.planners --out bench/planners --data fashion_mnist --seeds 0 1 2
    python -m autorank.bench.planners --out bench/quick --quick        # one seed, minutes
    python -m autorank.bench.planners --out bench/planners --report    # the report only

Planners, each built from the app's own configs (build_job) with the same trial steps
(search.trial_steps) and the same refit length (trainer.steps, what the device trains):

    head            the classifier alone
    plain           the deepest plain plan that fits: every region start tried against the cost
                    model, the earliest start whose plan (every candidate from it on trained
                    plainly) is within the budget: what an engineer does by hand
    knapsack        the paper's planner (search=knapsack)
    uniform <key>   one ASI level of the space (asi@0.9; asi@0.9:b keeps the batch mode whole)
                    on every candidate of the deepest region where it fits
    random, tpe, nsga2   the Optuna study with that sampler and no warm starts
    default         the study as the app runs it: the config's sampler and warm starts

Studies run with search.references=false: the reference refits (plain backprop of everything,
the head alone) change no exported plan, and head and plain are planners here. `seed=<k>` sets
the data order, the head's initialisation and the sampler, and also the base model's
pretraining (trainer.seed), so each seed starts from its own pretrained base.

Accuracies compared are refit accuracies at trainer.steps: a fixed plan is fine-tuned that long;
a study refits its best front plans and exports the best refit plan. A fixed plan also runs the
trial length once (its proxy), so that "trials to reach the knapsack plan" compares the study's
trials with the knapsack plan at the same fidelity. `--long-factor F` refits each exported plan
for F times trainer.steps (the run goes on from its shorter one: autorank/workload/resume.py).
The frozen prefix's features at every cut are computed once per seed before the planners run
(warm_features) and each planner starts with no run snapshots, so its wall and CPU time are its
fine-tunes, its study and its refits, on the same footing as every other planner's.

The output folder: results/<budget>/<planner>/seed<k>.json (one run each; a run whose file is
there is skipped), studies/*.db (SQLite: an interrupted study resumes), plans/, runs/,
budgets.json, report.md and figures/<budget>.png.

Budgets: `device`, the device config's training budget, and `tight`: just below the
smallest predicted peak of a plain plan that trains more than the last `--tight-layers`
candidates, so that there the best plain plan trains only those (budgets.json says both in MB).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autorank.errors import ConfigError
from autorank.units import MB

SEARCHES = {"random": ("random", False), "default": (None, True), "tpe": ("tpe", False),
            "nsga2": ("nsga2", False)}  # planner -> (sampler config, None: the config's; warm starts)
PLANNERS = ("head", "plain", "knapsack", "uniform", *SEARCHES)
BUDGETS = ("device", "tight")
# --quick: a smoke run of every planner (not a measurement): one seed, 4 trials, a few steps, 32
# training images per class (5 classes: more than one batch of 128) at 32 px (validation stays the
# downstream test set, which the 96 px default evaluates at ~50 s per deep fine-tune on 2 busy cores)
QUICK = {"seeds": [0], "trials": 4, "trial_steps": 5, "refit_steps": 10, "long_factor": 2,
         "max_per_class": 32, "input_size": 32}


@dataclass
class Settings:
    """The command line, defaults resolved (Bench.resolve: None takes the config's value)."""

    out: Path
    root: Path
    data: str = "fashion_mnist"
    model: str = "mcunet_like"
    device: str = "rpi4"
    seeds: list[int] = field(default_factory=lambda: [0])
    trials: int | None = None
    trial_steps: int | None = None
    refit_steps: int | None = None
    long_factor: int = 0
    budgets: list[str] = field(default_factory=lambda: list(BUDGETS))
    tight_layers: int = 4
    planners: list[str] = field(default_factory=lambda: list(PLANNERS))
    overrides: list[str] = field(default_factory=list)


@dataclass
class Job:
    cfg: Any
    workload: Any
    device: Any
    search: Any
    sampler: Any


def compose(overrides: Sequence[str]) -> Any:
    """The app's config (autorank/conf/config.yaml) composed with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from autorank.app import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def build_job(overrides: Sequence[str], workloads: dict[str, Any] | None = None) -> Job:
    """What autorank/app.py `run` does before its search runs, for the config the overrides
    compose: check it, build the Workload, device, search and sampler, prepare the base model.
    `workloads`: Workloads already built, by model, data, trainer and folders; one of the same
    (another planner or budget of the same seed) is reused with its feature cache."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from autorank.app import check_storage_and_outputs
    from autorank.validate import check_config
    from autorank.workload.workload import Workload

    cfg = compose(overrides)
    check_config(cfg)
    check_storage_and_outputs(cfg)
    fresh = Workload.from_config(cfg)  # cheap until prepare(); its device carries the budget
    key = json.dumps({g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "data", "trainer")}
                     | {"cache": cfg.paths.cache_dir, "data_dir": cfg.paths.data_dir}, sort_keys=True, default=str)
    workload = fresh if workloads is None else workloads.setdefault(key, fresh)
    search = instantiate(cfg.search)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    workload.prepare(progress=False)
    return Job(cfg, workload, fresh.device, search, sampler)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def job_overrides(st: Settings, planner: str, budget: str, budget_mb: float | None, seed: int) -> list[str]:
    tag = f"{budget}-{slug(planner)}-seed{seed}"
    out = [f"+device={st.device}", f"data={st.data}", f"model={st.model}", f"seed={seed}", "~tracking",
           f"paths.root={st.root}", f"paths.output_dir={st.out}/runs/{tag}", "export.data_path=null",
           "export.device_check=false", f"export.path={st.out}/plans/{tag}.yaml", "search.progress=false"]
    if budget_mb is not None:
        out.append(f"device.budget_mb={budget_mb}")
    if st.refit_steps:
        out.append(f"trainer.steps={st.refit_steps}")
    if planner not in SEARCHES:
        return out + ["search=knapsack", *st.overrides]
    sampler, warm = SEARCHES[planner]
    out += ["search=optuna", f"search.warm_start={str(warm).lower()}", "search.references=false",
            f"search.storage=sqlite:///{st.out}/studies/{tag}.db", f"search.study_name={tag}"]
    out += [f"sampler={sampler}"] if sampler else []
    out += [f"search.n_trials={st.trials}"] if st.trials else []
    out += [f"search.trial_steps={st.trial_steps}"] if st.trial_steps else []
    return out + list(st.overrides)


# --- plans of a region ----------------------------------------------------------------------------
def region_choices(prof: Any, start: int, key: str = "full") -> dict[str, str]:
    """Candidates before `start` frozen; from it on `key` where the layer offers it, else trained
    plainly (the head)."""
    out = {}
    for i, n in enumerate(prof.layer_names):
        cs = prof.layer(n).choices
        if i < start:
            out[n] = "frozen" if "frozen" in cs else cs[0]
        else:
            out[n] = key if key in cs else ("full" if "full" in cs else cs[0])
    return out


def deepest_fitting(prof: Any, cost: Any, budget_bytes: int, key: str = "full") -> tuple[int, dict, int] | None:
    """(region start, choices, predicted peak) of the earliest region start whose plan fits."""
    for s in range(len(prof.layer_names)):
        ch = region_choices(prof, s, key)
        peak = int(cost.peak(ch).total_bytes)
        if peak <= budget_bytes:
            return s, ch, peak
    return None


def tight_budget(prof: Any, cost: Any, k: int) -> tuple[float, str]:
    """(budget MB, why): below the cheapest plain plan that trains more than the last k
    candidates, at or above the plain plan of the last k."""
    n = len(prof.layer_names)
    if not 1 <= k < n:
        raise ConfigError(f"--tight-layers {k}: the space has {n} candidates; pass 1 to {n - 1}")
    peaks = [int(cost.peak(region_choices(prof, s)).total_bytes) for s in range(n)]
    deeper, last_k = min(peaks[:n - k]), peaks[n - k]
    mb = math.floor((deeper - 1) / MB * 1e4) / 1e4
    if int(mb * MB) < last_k:
        raise ConfigError(f"--tight-layers {k}: training the last {k} candidates plainly ({last_k / MB:.2f} MB) "
                          f"costs no less than a deeper plain plan ({deeper / MB:.2f} MB); pass another number")
    return mb, (f"plain training of the last {k} candidates needs {last_k / MB:.2f} MB and every deeper plain "
                f"plan at least {deeper / MB:.2f} MB: at {mb:.2f} MB the best plain plan trains only the last {k}")


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


# --- the runs -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, st: Settings):
        self.st = st
        self.workloads: dict[str, Any] = {}
        self.costs: dict[int, tuple[Any, Any]] = {}

    def result_path(self, planner: str, budget: str, seed: int) -> Path:
        return self.st.out / "results" / budget / slug(planner) / f"seed{seed}.json"

    def profile(self, job: Job) -> tuple[Any, Any]:
        """The space's profile (cached on disk by the search) and the cost model, per workload."""
        from autorank.search import PlanCost, load_space, profile_workload

        wl = job.workload
        if id(wl) not in self.costs:
            prof = profile_workload(wl, load_space(job.search.space), n_batches=job.search.n_calibration_batches,
                                    cache_dir=job.cfg.paths.cache_dir, progress=False)
            self.costs[id(wl)] = (prof, PlanCost(wl.model, wl.example_input(), prof, loss=wl.loss))
        return self.costs[id(wl)]

    def resolve(self) -> None:
        """Step counts and trials the command line left out: the config's."""
        cfg = compose(job_overrides(self.st, "default", "device", None, self.st.seeds[0]))
        self.st.trials = self.st.trials or int(cfg.search.n_trials)
        self.st.trial_steps = self.st.trial_steps or int(cfg.search.trial_steps)
        self.st.refit_steps = self.st.refit_steps or int(cfg.trainer.steps)

    def budgets(self) -> dict[str, dict]:
        """budgets.json: {name: {mb (None: the device config's), bytes, why}}, computed once."""
        path = self.st.out / "budgets.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if all(b in done for b in self.st.budgets):
            return done
        job = build_job(job_overrides(self.st, "knapsack", "device", None, self.st.seeds[0]), self.workloads)
        prof, cost = self.profile(job)
        done["device"] = {"mb": None, "bytes": int(job.device.budget_bytes),
                          "why": f"the {job.device.name} config's training budget"}
        if "tight" in self.st.budgets:
            mb, why = tight_budget(prof, cost, self.st.tight_layers)
            done["tight"] = {"mb": mb, "bytes": int(mb * MB), "why": why}
        _write_json(path, done)
        return done

    def planners(self, prof: Any) -> list[str]:
        """The planners asked for, `uniform` as one planner per ASI key the space offers."""
        keys = sorted({c for n in prof.layer_names for c in prof.layer(n).choices if c.startswith("asi@")})
        return [p for name in self.st.planners for p in ([f"uniform {k}" for k in keys] if name == "uniform" else [name])]

    def run(self) -> None:
        self.resolve()
        budgets = self.budgets()
        for seed in self.st.seeds:
            self.workloads.clear()  # one seed's base model, features and runs in memory at a time
            self.costs.clear()
            job = build_job(job_overrides(self.st, "knapsack", "device", None, seed), self.workloads)
            prof = self.profile(job)[0]
            planners = self.planners(prof)
            if any(not self.result_path(p, b, seed).is_file() for p in planners for b in self.st.budgets):
                warm_features(job.workload, prof)
            for budget in self.st.budgets:
                for planner in planners:
                    self.run_one(planner, budget, budgets[budget]["mb"], seed)

    def run_one(self, planner: str, budget: str, budget_mb: float | None, seed: int) -> Path:
        path = self.result_path(planner, budget, seed)
        if path.is_file():
            return path
        print(f"planners: {planner} at the {budget} budget, seed {seed}", flush=True)
        job = build_job(job_overrides(self.st, planner, budget, budget_mb, seed), self.workloads)
        self.profile(job)
        fresh_runs(job.workload)
        t0, c0 = time.perf_counter(), time.process_time()
        rec = self.run_search(job) if planner in SEARCHES else self.run_fixed(job, planner)
        budget_bytes = int(job.device.budget_bytes)
        rec.update(planner=planner, budget=budget, budget_bytes=budget_bytes, seed=seed,
                   trial_steps=self.st.trial_steps, refit_steps=self.st.refit_steps,
                   wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                   hypervolume=front_hypervolume(rec["trials"], budget_bytes))
        acc = rec.get("refit_accuracy")
        print(f"  refit accuracy {'-' if acc is None else f'{acc:.3f}'}, {rec['wall_s']:.0f} s", flush=True)
        return _write_json(path, rec)

    def run_fixed(self, job: Job, planner: str) -> dict:
        from autorank.search.planfile import export_plan
        from autorank.search.refit import HEAD_ALONE, reference_choices

        prof, cost = self.profile(job)
        budget = int(job.device.budget_bytes)
        if planner == "knapsack":
            return self.run_knapsack(job)
        if planner == "head":
            ch = reference_choices(prof)[HEAD_ALONE]
            peak = int(cost.peak(ch).total_bytes)
            found = (len(ch) - 1, ch, peak) if peak <= budget else None
        else:
            found = deepest_fitting(prof, cost, budget, "full" if planner == "plain" else planner.split()[1])
        if found is None:
            return {"feasible": False, "trials": []}
        start, ch, peak = found
        plan = prof.to_plan(ch, meta={"source": f"bench {planner}", "budget_bytes": budget})
        rec = self.fit(job.workload, plan, {})
        rec.update(feasible=True, choices=ch, hparams={}, region_start=start, predicted_peak_bytes=peak,
                   trials=[_trial(0, rec["proxy_accuracy"], peak, rec.pop("proxy_wall_s"))])
        rec["plan_file"] = str(export_plan(plan, job.cfg.export.path, job.workload.model,
                                           meta={"predicted_peak_bytes": peak, "accuracy": rec["refit_accuracy"]}))
        return rec

    def run_knapsack(self, job: Job) -> dict:
        """The app's knapsack search (its refit at trainer.steps), then the trial-length proxy and
        the long refit of its plan."""
        from autorank.plan import Plan

        res = job.search.run(job.workload, job.device)  # paths and progress come from its YAML
        best = res.best
        plan = Plan.from_dict(dict(best.plan))
        t0 = time.perf_counter()
        proxy = job.workload.finetune(plan, max_steps=self.st.trial_steps, progress=False)
        peak = int(best.predicted_peak_bytes)
        rec = {"feasible": True, "choices": dict(best.choices), "hparams": {}, "predicted_peak_bytes": peak,
               "refit_accuracy": float(best.val_accuracy), "proxy_accuracy": float(proxy.val_accuracy),
               "plan_file": str(res.export_path),
               "trials": [_trial(0, float(proxy.val_accuracy), peak, time.perf_counter() - t0)]}
        rec["long_accuracy"] = self.long_refit(job.workload, plan, {})
        return rec

    def run_search(self, job: Job) -> dict:
        from autorank.plan import Plan

        res = job.search.run(job.workload, job.device, sampler=job.sampler)  # paths, progress: its YAML
        trials = [_trial(r.number, r.val_accuracy, r.predicted_peak_bytes, r.wall_s, r.state, r.source)
                  for r in sorted(res.trials, key=lambda r: r.number)]
        best = res.best
        if best is None:
            return {"feasible": False, "trials": trials}
        return {"feasible": True, "choices": dict(best.choices), "hparams": dict(best.hparams),
                "predicted_peak_bytes": int(best.predicted_peak_bytes), "trial": best.number,
                "proxy_accuracy": best.val_accuracy, "refit_accuracy": best.refit_accuracy,
                "plan_file": str(res.export_path), "trials": trials,
                "long_accuracy": self.long_refit(job.workload, Plan.from_dict(dict(best.plan)), best.hparams)}

    def fit(self, wl: Any, plan: Any, hparams: Mapping[str, float]) -> dict:
        """A fixed plan: the trial-length proxy, the refit at trainer.steps and the long refit, each
        run going on from the one before."""
        t0 = time.perf_counter()
        proxy = wl.finetune(plan, max_steps=self.st.trial_steps, progress=False, **hparams)
        wall = time.perf_counter() - t0
        refit = wl.finetune(plan, max_steps=self.st.refit_steps, progress=False, **hparams)
        return {"proxy_accuracy": float(proxy.val_accuracy), "proxy_wall_s": wall,
                "refit_accuracy": float(refit.val_accuracy), "long_accuracy": self.long_refit(wl, plan, hparams)}

    def long_refit(self, wl: Any, plan: Any, hparams: Mapping[str, float]) -> float | None:
        if not self.st.long_factor:
            return None
        steps = self.st.long_factor * self.st.refit_steps
        return float(wl.finetune(plan, max_steps=steps, progress=False, **dict(hparams)).val_accuracy)


def warm_features(wl: Any, prof: Any) -> None:
    """The frozen prefix's features at the cut of every region start, computed once (shallow to
    deep: each cut goes on from the one before) with a one-step fine-tune per cut, so that no
    planner's time counts features another planner would have paid for."""
    from autorank.models import cut_name

    cuts = {}
    for s in range(len(prof.layer_names)):
        plan = prof.to_plan(region_choices(prof, s))
        cuts.setdefault(cut_name(wl.model, plan), plan)
    for plan in cuts.values():
        wl.finetune(plan, max_steps=1, progress=False)


def fresh_runs(wl: Any) -> None:
    """Forget the workload's run snapshots: a planner's run never goes on from another planner's."""
    from autorank.workload.resume import SnapshotCache

    wl.snapshots = SnapshotCache(wl.snapshots.max_bytes)


def _trial(number: int, acc: float | None, peak: int | None, wall: float | None, state: str = "complete",
           source: str | None = None) -> dict:
    return {"number": int(number), "state": state, "accuracy": None if acc is None else float(acc),
            "peak_bytes": None if peak is None else int(peak), "wall_s": float(wall or 0.0), "source": source}


def _write_json(path: Path, data: Any) -> Path:
    from autorank.io import atomic_write

    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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


# --- the command line ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> tuple[Settings, bool]:
    p = argparse.ArgumentParser(prog=prog or "autorank-bench planners",
                                description="Compare the ways to choose a plan at the same budget and training.")
    p.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes what is missing)")
    p.add_argument("--root", type=Path, default=Path.cwd(),
                   help="paths.root: data/ and the app's cache .cache/autorank (base models, profiles) under it")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--model", default="mcunet_like")
    p.add_argument("--device", default="rpi4")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--trials", type=int, help="trials per study (default: search.n_trials)")
    p.add_argument("--trial-steps", type=int, help="SGD steps per trial (default: search.trial_steps)")
    p.add_argument("--refit-steps", type=int, help="SGD steps of a refit (default: trainer.steps)")
    p.add_argument("--long-factor", type=int, help="also refit each exported plan this many times longer (0: no)")
    p.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS))
    p.add_argument("--tight-layers", type=int, default=4,
                   help="the tight budget: the best plain plan that fits trains only this many last candidates")
    p.add_argument("--planners", nargs="+", choices=PLANNERS, default=list(PLANNERS))
    p.add_argument("--max-per-class", type=int, help="data.max_per_class: training images per class")
    p.add_argument("--input-size", type=int, help="data.input_size: image side in pixels")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of the app's config for every run (repeatable), e.g. data.input_size=64")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run: {', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given")
    p.add_argument("--report", action="store_true", help="only write report.md and the figures from the results")
    a = p.parse_args(argv)
    quick = QUICK if a.quick else {}
    pick = {k: getattr(a, k) if getattr(a, k) is not None else quick.get(k)
            for k in ("seeds", "trials", "trial_steps", "refit_steps", "long_factor", "max_per_class", "input_size")}
    overrides = list(a.set) + [f"data.{k}={pick[k]}" for k in ("max_per_class", "input_size") if pick[k]]
    st = Settings(out=a.out.resolve(), root=a.root.resolve(), data=a.data, model=a.model, device=a.device,
                  seeds=pick["seeds"] or [0], trials=pick["trials"], trial_steps=pick["trial_steps"],
                  refit_steps=pick["refit_steps"], long_factor=pick["long_factor"] or 0, budgets=a.budgets,
                  tight_layers=a.tight_layers, planners=a.planners, overrides=overrides)
    return st, a.report


def quiet() -> None:
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from autorank.app import config_error
    from autorank.interrupt import Interrupted, stop_on_signals

    st, report_only = parse_args(argv, prog)
    try:
        with stop_on_signals():
            if not report_only:
                quiet()
                Bench(st).run()
            path = write_report(st.out)
    except Interrupted as e:
        print(f"\n{e.message()} (rerun the same command to resume)", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        err = config_error(e)
        if err is None:
            raise
        print(f"planners: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
