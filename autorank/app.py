"""The Hydra application: `python -m autorank +device=rpi4`.

config -> Workload (device, model, data, trainer, paths) -> search (knapsack | optuna) -> tracking
-> exported plan. `main` is the thin Hydra wrapper; `run(cfg)` is a plain function that tests call
with composed configs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from autorank.errors import ConfigError
from autorank.redact import guard_console, guard_logging, redact_text, redact_url
from autorank.units import MB
from autorank.validate import check_config, run_folder_error

CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data: ships in the wheel


class UsageError(ConfigError):
    """A mistake in how autorank was called: printed without a traceback, exit status 2."""


def device_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "device").glob("*.yaml"))


def _require_device(cfg: DictConfig) -> None:
    if cfg.get("device") is None:
        names = ", ".join(device_names())
        raise UsageError(
            "no target device: autorank sizes the search to a device's memory budget.\n"
            f"  choose one of: {names}\n"
            "  e.g.   python -m autorank +device=rpi4\n"
            "  (override its budget with device.budget_mb=..., its RAM with device.ram_mb=...)")


def _quiet() -> None:
    """The rich progress bars and the summary say what happens; library chatter is noise."""
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "mlflow.store.db.utils", "alembic", "alembic.runtime.migration",
                 "lightning.pytorch.trainer.connectors.signal_connector"):  # "Received SIGTERM"
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run(cfg: DictConfig) -> Any:
    """Build everything from the composed config and run the configured search."""
    _require_device(cfg)
    check_config(cfg)  # before torch, data and pretraining: a bad value costs a second
    check_storage_and_outputs(cfg)

    from hydra.utils import instantiate

    from autorank.workload.workload import Workload

    _quiet()
    workload = Workload.from_config(cfg)
    device = workload.device
    search = instantiate(cfg.search)
    _check_space(search, workload)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") is not None else None
    tracker = instantiate(cfg.tracking) if cfg.get("tracking") is not None else None
    budget_mb = device.budget_bytes / MB
    print(f"autorank: device {device.name} ({device.ram_mb:.0f} MB RAM - OS {device.os_mb:.0f} MB = "
          f"{device.process_budget_mb:.0f} MB for the training process; runtime {device.runtime_mb:.0f} MB: "
          f"training budget {budget_mb:.0f} MB), "
          f"model {cfg.model.build._target_.rsplit('.', 1)[-1]}, data {cfg.data._target_.rsplit('.', 1)[-1]}, "
          f"search {search.name}", flush=True)
    workload.prepare(progress=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    result = search.run(workload, device, sampler=sampler, tracker=tracker, config=config)
    _summary(result, device, tracker)
    _device_next_step(cfg, workload, result)
    return result


def check_storage_and_outputs(cfg: DictConfig) -> None:
    """Before any work: the study's storage can be used (autorank.search.storage.check_storage),
    and no file the run writes outside its run folder (export.path, export.data_path, a SQLite
    tracking store) is one of its inputs or the study's storage: writing there would destroy it."""
    from autorank.search.storage import check_storage, sqlite_path
    from autorank.validate import check_writable

    storage = OmegaConf.select(cfg, "search.storage", default=None)
    tracking = OmegaConf.select(cfg, "tracking.uri", default=None)
    inputs = {"the study's storage (search.storage)": storage and sqlite_path(str(storage)),
              "the model checkpoint (model.checkpoint)": OmegaConf.select(cfg, "model.checkpoint", default=None),
              "the search space file (space.path)": OmegaConf.select(cfg, "space.path", default=None)}
    tracking_db = tracking and sqlite_path(str(tracking))
    if tracking_db:
        check_writable(tracking_db, "tracking.uri", inputs)
    inputs["the tracking store (tracking.uri)"] = tracking_db
    for key in ("export.path", "export.data_path"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_writable(value, key, inputs)
            inputs[f"the file {key} names"] = value
    if storage:
        check_storage(str(storage))
    if tracking:
        from autorank.tracking.mlflow_tracker import check_tracking

        check_tracking(str(tracking))


def _device_next_step(cfg: DictConfig, workload: Any, result: Any) -> None:
    """Write the downstream data for the device runner and print the command that trains the
    exported plan with it, as a device would (torch only)."""
    plan_path = getattr(result, "export_path", None)
    if not plan_path or not Path(plan_path).is_file():
        return
    data = cfg.export.get("data_path")
    if data:
        workload.save_device_data(data)
    print(f"on the device (pip install autorank; torch only):\n  autorank-device {plan_path} "
          f"{workload.checkpoint_path} {data or 'DATA'}", flush=True)
    if data and cfg.export.get("device_check", False):
        _device_check(plan_path, workload.checkpoint_path, data)


def _device_check(plan: Path, checkpoint: Path, data: str) -> None:
    """Two training steps of the exported plan by the device runner in a fresh process: its
    measured peak against the prediction, here (the runtime is this machine's torch build; the
    training part is the plan's). A warning when they differ by more than 10%."""
    import subprocess

    argv = [sys.executable, "-m", "autorank.device", str(plan), str(checkpoint), str(data), "--steps", "2",
            "--ignore-memory-check"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
                           env={**os.environ, "AUTORANK_DEVICE_CHILD": "1"})
    except subprocess.TimeoutExpired:
        print("device check: the runner took over 30 minutes; skipped", flush=True)
        return
    line = next((s for s in r.stdout.splitlines() if s.startswith("process peak while training")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"warning: device check failed (exit {r.returncode}): {tail}", file=sys.stderr, flush=True)
        return
    print(f"device check (2 steps here, this machine's torch): {line}", flush=True)
    err = line.rsplit("(", 1)[-1].rstrip(")%")
    try:
        if abs(float(err)) > 10:
            print(f"warning: the measured process peak differs from the prediction by {err}%: the memory "
                  "model does not describe this plan on this build (docs/DEVICE.md)", file=sys.stderr, flush=True)
    except ValueError:
        pass


def _check_space(search: Any, workload: Any) -> None:
    """Load the search space (the `space` group, or an older `search.space=NAME|PATH`) and resolve
    it on a fresh (untrained) model now, so that a bad space fails before pretraining, not after."""
    space = getattr(search, "space", None)
    if space is None:
        return
    from autorank.search.space import load_space

    load_space(space).resolve(workload.spec(num_classes=workload.num_classes))


def config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind `exc` (hydra wraps what a _target_ raises in InstantiationException,
    the cause chained as __cause__), or None: then `exc` is a bug and keeps its traceback."""
    from hydra.errors import InstantiationException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return exc
        if not isinstance(exc, InstantiationException):
            return None
        exc = exc.__cause__ or exc.__context__
    return None


def _storage_error(exc: BaseException) -> ConfigError | None:
    """A database error of the study's storage (a full disk, a read-only file, the server gone)
    as one line (autorank.search.storage.storage_error), or None."""
    from autorank.search.storage import storage_error

    return storage_error(exc)


def _tracking_error(exc: BaseException, cfg: DictConfig) -> ConfigError | None:
    """A tracking server that stopped answering during the run, as one line
    (autorank.tracking.mlflow_tracker.tracking_error), or None."""
    from autorank.tracking.mlflow_tracker import tracking_error

    return tracking_error(exc, OmegaConf.select(cfg, "tracking.uri", default=None))


def _summary(result: Any, device: Any, tracker: Any) -> None:
    """The search result's own summary (autorank.search.result.SearchResult.summary), then where
    the tracker keeps the runs."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # written to a file or pipe: rich would assume 80 columns and cut the front table's
        # columns to "GFLOP…"; a log has room for the whole table ($COLUMNS still decides)
        console = Console(width=160)
    result.summary(console, device, _short_plan)
    if tracker is not None:
        uri = redact_url(tracker.uri)
        console.print(f"MLflow: {uri}  (open with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")


def _short_plan(choices: dict[str, str]) -> str:
    """One code per candidate layer in forward order, each its method's (autorank.methods.
    short_code): '-' frozen, 'F' full, '.8' ASI at eps 0.8, '.8b' the same with the batch mode
    kept whole, 'L4' LoRA at rank 4, 'L4.8' LoRA + ASI, 'R' a recomputed block."""
    from autorank.methods import short_code

    return " ".join(short_code(c) for c in choices.values())


def redact_hydra_files(cfg: DictConfig) -> None:
    """Hydra saved the config and the command line's overrides under <output_dir>/.hydra before
    the job started: rewrite them (atomically) with every URL password masked. (A URL taken from
    the environment, search.storage='${oc.env:AUTORANK_STORAGE}', is saved unresolved anyway.)"""
    from hydra.core.hydra_config import HydraConfig

    from autorank.io import atomic_write

    try:
        hc = HydraConfig.get()
    except ValueError:  # not run by Hydra (tests compose configs themselves)
        return
    if hc.output_subdir is None:
        return
    for path in (Path(hc.runtime.output_dir) / hc.output_subdir).glob("*.yaml"):
        text = path.read_text()
        clean = _redact_yaml(text)
        if clean != text:
            atomic_write(path, lambda tmp: tmp.write_text(clean))


def _redact_yaml(text: str) -> str:
    """A YAML file's text with every password masked: parsed, each string redacted whole, dumped
    again (a long value may be folded over two lines, where a line-by-line pass would miss it);
    the text itself when it does not parse."""
    import yaml

    from autorank.redact import redact_config

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return redact_text(text)
    clean = redact_config(data)
    if clean == data:
        return redact_text(text)  # nothing in a value; a comment may still hold one
    return yaml.safe_dump(clean, sort_keys=False, allow_unicode=True, width=1 << 16)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    import traceback

    from autorank.interrupt import Interrupted, check, stop_on_signals

    redact_hydra_files(cfg)
    guard_logging()  # Hydra's <job>.log in the run folder: no password either
    # ConfigError covers UsageError, BudgetTooSmall, DatasetMissing and every bad config value
    # (autorank/errors.py); any other exception is a bug and keeps its traceback, printed here
    # (through the redacting stderr of main()) rather than by Hydra, whose report repeats every
    # override of the command line, passwords included. SIGINT/SIGTERM: the study closes its
    # trial (autorank/interrupt.py), then one line and 128 + the signal.
    try:
        with stop_on_signals():
            run(cfg)
            check()  # a signal swallowed in the last steps: still one line and 128 + the signal
    except Interrupted as e:
        print(f"\n{redact_text(e.message())}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:
        err = config_error(e) or _storage_error(e) or _tracking_error(e, cfg)
        if err is None:
            traceback.print_exc()
            sys.exit(1)
        print(f"autorank: error: {redact_text(str(err))}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    guard_console()  # before Hydra and logging hold the streams: no password reaches the console
    err = run_folder_error(sys.argv[1:], os.getcwd(), dict(os.environ))  # Hydra makes it before run()
    if err:
        print(f"autorank: error: {redact_text(err)}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
