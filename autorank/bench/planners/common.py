"""The planners benchmark's names, settings and files, shared by its runs and its report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEARCHES = {"random": ("random", False), "default": (None, True), "tpe": ("tpe", False),
            "nsga2": ("nsga2", False)}  # planner -> (sampler config, None: the config's; warm starts)
PLANNERS = ("head", "plain", "recompute", "knapsack", "uniform", *SEARCHES)
BUDGETS = ("device", "tight")
# --quick: a smoke run of every planner (not a measurement): one seed, 4 trials, a few steps, 32
# training images per class (5 classes: more than one batch of 128) at 32 px
QUICK = {"seeds": [0], "trials": 4, "trial_steps": 5, "refit_steps": 10, "long_factor": 2,
         "max_per_class": 32, "input_size": 32}
# --quick also: 50 validation images per class, and the base pretrained on the capped upstream set
QUICK_SETS = ("++data.val_max_per_class=50", "++data.upstream_max_per_class=same")


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
    base: Path | None = None  # the base model every seed fine-tunes (Bench.base_model)
    mlflow: str | None = None  # a tracking URI the report is logged to
    lrs: list[float] | None = None  # a fixed plan's lrs (Bench.resolve: the study's range ends and trainer.lr)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _trial(number: int, acc: float | None, peak: int | None, wall: float | None, state: str = "complete",
           source: str | None = None) -> dict:
    return {"number": int(number), "state": state, "accuracy": None if acc is None else float(acc),
            "peak_bytes": None if peak is None else int(peak), "wall_s": float(wall or 0.0), "source": source}


def _write_json(path: Path, data: Any) -> Path:
    from autorank.io import atomic_write

    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


