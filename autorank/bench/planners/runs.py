"""The planners' runs: each planner's job built from the app's configs, its plan found and refit."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorank.bench.planners.common import SEARCHES, Settings, _trial, _write_json, slug
from autorank.bench.planners.report import front_hypervolume
from autorank.errors import ConfigError
from autorank.units import MB


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



def job_overrides(st: Settings, planner: str, budget: str, budget_mb: float | None, seed: int) -> list[str]:
    tag = f"{budget}-{slug(planner)}-seed{seed}"
    out = [f"+device={st.device}", f"data={st.data}", f"model={st.model}", f"seed={seed}", "~tracking",
           f"paths.root={st.root}", f"paths.output_dir={st.out}/runs/{tag}", "export.data_path=null",
           "export.device_check=false", f"export.path={st.out}/plans/{tag}.yaml", "search.progress=false"]
    if budget_mb is not None:
        out.append(f"device.budget_mb={budget_mb}")
    if st.base is not None:
        out.append(f"model.checkpoint={st.base}")
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
def region_choices(prof: Any, start: int, key: str = "full", recompute: bool = False) -> dict[str, str]:
    """Candidates before `start` frozen; from it on `key` where the layer offers it, else trained
    plainly (the head). Blocks offered for recomputation are kept as they are, or with `recompute`
    recomputed where each of their candidates is in the region."""
    names = prof.candidate_names
    out = {}
    for i, n in enumerate(names):
        cs = prof.layer(n).choices
        if i < start:
            out[n] = "frozen" if "frozen" in cs else cs[0]
        else:
            out[n] = key if key in cs else ("full" if "full" in cs else cs[0])
    for b in prof.block_names:
        inside = [i for i, n in enumerate(names) if n.startswith(b + ".")]
        out[b] = "recompute" if recompute and inside and min(inside) >= start else "frozen"
    return out


def deepest_fitting(prof: Any, cost: Any, budget_bytes: int, key: str = "full",
                    recompute: bool = False) -> tuple[int, dict, int] | None:
    """(region start, choices, predicted peak) of the earliest region start whose plan fits."""
    for s in range(len(prof.candidate_names)):
        ch = region_choices(prof, s, key, recompute)
        peak = int(cost.peak(ch).total_bytes)
        if peak <= budget_bytes:
            return s, ch, peak
    return None


def tight_budget(prof: Any, cost: Any, k: int) -> tuple[float, str]:
    """(budget MB, why): below the cheapest plain plan that trains more than the last k
    candidates, at or above the plain plan of the last k."""
    n = len(prof.candidate_names)
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
        if not self.st.lrs:  # the study's lr range (its ends) and the trainer's lr
            rng = cfg.space.get("hparams", {}).get("lr") or {}
            self.st.lrs = sorted({float(cfg.trainer.lr), *(float(rng[k]) for k in ("low", "high") if k in rng)})

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

    def base_model(self) -> Path:
        """The first seed's base model (pretrained on a cache miss): every seed's runs start from it."""
        job = build_job(job_overrides(self.st, "knapsack", "device", None, self.st.seeds[0]), self.workloads)
        return job.workload.checkpoint_path

    def run(self) -> None:
        self.resolve()
        self.st.base = self.st.base or self.base_model()
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
        rec.update(planner=planner, budget=budget, budget_bytes=budget_bytes, seed=seed, base=str(self.st.base),
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
            from autorank.search.knapsack import knapsack

            res = knapsack(prof, budget, cost.peak)  # what search=knapsack trains (BudgetTooSmall: none fits)
            found = (None, dict(res.choices), int(res.predicted_peak_bytes))
        elif planner == "head":
            ch = reference_choices(prof)[HEAD_ALONE]
            peak = int(cost.peak(ch).total_bytes)
            found = (len(ch) - 1, ch, peak) if peak <= budget else None
        else:
            key = "full" if planner in ("plain", "recompute") else planner.split()[1]
            found = deepest_fitting(prof, cost, budget, key, recompute=planner == "recompute")
        if found is None:
            return {"feasible": False, "trials": []}
        start, ch, peak = found
        plan = prof.to_plan(ch, meta={"source": f"bench {planner}", "budget_bytes": budget})
        rec = self.fit(job.workload, plan, peak)
        rec.update(feasible=True, choices=ch, region_start=start, predicted_peak_bytes=peak)
        rec["plan_file"] = str(export_plan(plan, job.cfg.export.path, job.workload.model,
                                           meta={"predicted_peak_bytes": peak, "accuracy": rec["refit_accuracy"],
                                                 "lr": rec["hparams"]["lr"]}))
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

    def fit(self, wl: Any, plan: Any, peak: int) -> dict:
        """A fixed plan as an engineer tunes it by hand: the trial-length proxy at each lr of
        `lrs` (one trial each), then the best one's refit at trainer.steps and long refit, each
        run going on from the one before."""
        trials, best = [], None
        for i, lr in enumerate(self.st.lrs):
            t0 = time.perf_counter()
            acc = float(wl.finetune(plan, max_steps=self.st.trial_steps, progress=False, lr=lr).val_accuracy)
            trials.append(_trial(i, acc, peak, time.perf_counter() - t0) | {"lr": lr})
            best = trials[-1] if best is None or acc > best["accuracy"] else best
        hp = {"lr": best["lr"]}
        refit = wl.finetune(plan, max_steps=self.st.refit_steps, progress=False, **hp)
        return {"proxy_accuracy": best["accuracy"], "hparams": hp, "trials": trials,
                "refit_accuracy": float(refit.val_accuracy), "long_accuracy": self.long_refit(wl, plan, hp)}

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
    for s in range(len(prof.candidate_names)):
        plan = prof.to_plan(region_choices(prof, s))
        cuts.setdefault(cut_name(wl.model, plan), plan)
    for plan in cuts.values():
        wl.finetune(plan, max_steps=1, progress=False)


def fresh_runs(wl: Any) -> None:
    """Forget the workload's run snapshots: a planner's run never goes on from another planner's."""
    from autorank.workload.resume import SnapshotCache

    wl.snapshots = SnapshotCache(wl.snapshots.max_bytes)


