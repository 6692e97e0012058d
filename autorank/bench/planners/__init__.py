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
    recompute       the same with every block the space offers for recomputation recomputed
                    where it lies in the region (activation checkpointing: exact, so only the
                    region's depth changes)
    knapsack        the paper's planner (search=knapsack)
    uniform <key>   one ASI level of the space (asi@0.9; asi@0.9:b keeps the batch mode whole)
                    on every candidate of the deepest region where it fits
    random, tpe, nsga2   the Optuna study with that sampler and no warm starts
    default         the study as the app runs it: the config's sampler and warm starts

A fixed plan (head, plain, recompute, knapsack, uniform) is tuned as by hand: one proxy trial
(search.trial_steps) per lr of --lrs (default: the ends of the space's lr range and trainer.lr,
the range the study samples), the best one refit.

Studies run with search.references=false: the reference refits (plain backprop of everything,
the head alone) change no exported plan, and head and plain are planners here. `seed=<k>` sets
the data order, the head's initialisation and the sampler. Every seed starts from one base model:
the first seed's (pretrained once with the config's settings, cached), passed to each run as
model.checkpoint.

Accuracies compared are refit accuracies at trainer.steps: a fixed plan is refit that long at
its best proxy lr; a study refits its best front plans and exports the best refit plan. "Trials to
reach the knapsack plan" compares the study's trials with the knapsack plan's best proxy (the
same trial length). `--long-factor F` refits each exported plan
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
import sys
from collections.abc import Sequence
from pathlib import Path

from autorank.bench.planners.common import (BUDGETS, PLANNERS, QUICK, QUICK_SETS, SEARCHES, Settings, _trial, _write_json,
                                            slug)
from autorank.bench.planners.report import (front_hypervolume, hypervolume, log_report, reach, report_text,
                                            write_report)
from autorank.bench.planners.runs import (Bench, Job, build_job, compose, deepest_fitting, job_overrides,
                                          region_choices, tight_budget)

__all__ = ["BUDGETS", "PLANNERS", "QUICK", "SEARCHES", "Bench", "Job", "Settings", "build_job", "compose",
           "deepest_fitting", "front_hypervolume", "hypervolume", "job_overrides", "main", "parse_args", "reach",
           "region_choices", "report_text", "slug", "tight_budget", "write_report", "_trial", "_write_json"]


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
    p.add_argument("--lrs", type=float, nargs="+", help="a fixed plan's lrs, one proxy trial each, the best refit "
                   "(default: the ends of the space's lr range and trainer.lr, as the study searches)")
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
    p.add_argument("--mlflow", metavar="URI", help="also log the report, the figures and each planner's mean refit "
                   "accuracy to this MLflow tracking URI (experiment autorank-bench-planners)")
    a = p.parse_args(argv)
    quick = QUICK if a.quick else {}
    pick = {k: getattr(a, k) if getattr(a, k) is not None else quick.get(k)
            for k in ("seeds", "trials", "trial_steps", "refit_steps", "long_factor", "max_per_class", "input_size")}
    overrides = [*(QUICK_SETS if a.quick else ()), *a.set]
    overrides += [f"data.{k}={pick[k]}" for k in ("max_per_class", "input_size") if pick[k]]
    st = Settings(out=a.out.resolve(), root=a.root.resolve(), data=a.data, model=a.model, device=a.device,
                  seeds=pick["seeds"] or [0], trials=pick["trials"], trial_steps=pick["trial_steps"],
                  refit_steps=pick["refit_steps"], long_factor=pick["long_factor"] or 0, budgets=a.budgets,
                  tight_layers=a.tight_layers, planners=a.planners, overrides=overrides, mlflow=a.mlflow,
                  lrs=a.lrs)
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
    from autorank.redact import redact_url
    from autorank.interrupt import Interrupted, stop_on_signals

    st, report_only = parse_args(argv, prog)
    try:
        with stop_on_signals():
            if not report_only:
                quiet()
                Bench(st).run()
            path = write_report(st.out)
            if st.mlflow:
                print(f"MLflow run {log_report(st.out, st.mlflow)} in {redact_url(st.mlflow)}", flush=True)
    except Interrupted as e:
        print(f"\n{e.message()}", file=sys.stderr)  # it says how to go on: the same command
        return e.exit_code
    except Exception as e:
        err = config_error(e)
        if err is None:
            raise
        print(f"planners: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}", flush=True)
    return 0


