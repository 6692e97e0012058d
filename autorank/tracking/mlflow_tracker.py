"""MLflow tracking: one parent run per study, one nested run per trial, front artifacts at the end.

Uses MlflowClient directly (no global active run): a trial costs three store calls (create the
run with its tags, one log_batch of params and metrics, terminate), so the framework's overhead
per trial stays small next to training.

Many workers, one study: the study's parent run is found by its `study_name` tag, and created
only when there is none. Two workers that create one at the same moment both look again and keep
the earliest (start time, then run id); the other deletes its own. A SQLite store is created or
migrated under a file lock beside it (MLflow's schema migration is not safe to run twice at
once); for workers on several machines, point them all at one `mlflow server` (docs/RELIABILITY.md).
Each worker holding the study's run beats a heartbeat on it; a worker killed outright leaves its
run RUNNING until the next start in the experiment ends it KILLED (heartbeat.py).

A tracking server that refuses the connection is one line (ConfigError, exit status 2): before
any work (check_tracking: the server's port must answer), and later in the run (tracking_error:
the server went away), its URL's password masked.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autorank.errors import ConfigError
from autorank.io import creation_lock
from autorank.redact import redact_config, redact_url
from autorank.tracking.heartbeat import Heartbeat, beat_tag, end_lost_runs
from autorank.units import MB

# MLflow 3 opens an experiment on its GenAI overview (traces, judges) unless the experiment is
# tagged as model development: then it opens on the runs table. Key and value from MLflow 3.17's
# UI (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
CONNECT_TIMEOUT_S = 5.0
_REFUSED = ("connection refused", "failed to establish a new connection", "max retries exceeded",
            "name or service not known", "timed out", "connection aborted", "remote end closed")


def _refused(uri: str, reason: str) -> ConfigError:
    return ConfigError(f"tracking.uri: cannot connect to the MLflow server at {redact_url(uri)} ({reason}): "
                       "start it (mlflow server --backend-store-uri ... --host ... --port ...), or fix the host "
                       "and port in tracking.uri, and run the same command again to resume")


def check_tracking(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Before any work: an http(s) tracking URI's server answers on its port (a TCP connect;
    MLflow's own client would retry for minutes first). Other URIs (a SQLite store) are files:
    the app checks those as outputs."""
    import socket
    from urllib.parse import urlsplit

    if not uri.startswith(("http://", "https://")):
        return
    u = urlsplit(uri)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise ConfigError(f"tracking.uri: {redact_url(uri)} has no valid port ({e})") from None
    try:
        socket.create_connection((u.hostname or "localhost", port), timeout=timeout_s).close()
    except OSError as e:
        raise _refused(uri, e.strerror or type(e).__name__) from None


def tracking_error(exc: BaseException, uri: str | None) -> ConfigError | None:
    """The one-line ConfigError for a tracking server that stopped answering during the run,
    found in `exc` or its causes (MLflow's client wraps the HTTP library's error), or None: then
    it is no such error and keeps its traceback."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if (isinstance(exc, (ConnectionError, OSError)) or type(exc).__name__ in ("MlflowException", "ConnectionError")) \
                and any(n in text for n in _REFUSED):
            return _refused(uri, next(n for n in _REFUSED if n in text))
        exc = exc.__cause__ or exc.__context__
    return None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class MlflowTracker:
    """Tracking store `uri` (default in conf/tracking/mlflow.yaml: sqlite under mlruns/; the file
    store is refused by MLflow 3), artifacts under `artifact_location` for a new experiment."""

    def __init__(self, uri: str, experiment: str = "autorank", artifact_location: str | None = None,
                 run_name: str | None = None, log_config_params: bool = True):
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_name, self.log_config_params = run_name, log_config_params
        self._client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.trial_runs: dict[int, str] = {}
        self.info: dict[str, Any] = {}
        self.heartbeat: Heartbeat | None = None

    # --- plumbing ---
    @property
    def client(self):
        self.connect()
        return self._client

    def connect(self) -> str:
        """Open the store and the experiment (created, or tagged as model development, on first
        use); returns the experiment's id."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            with creation_lock(self.uri):  # a SQLite store: created or migrated by one worker
                client = MlflowClient(tracking_uri=self.uri)
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    self.experiment_id = self._create_experiment(client)
                    exp = client.get_experiment(self.experiment_id)
            self.experiment_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older autorank
                client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self._client = client
        return self.experiment_id

    def _create_experiment(self, client) -> str:
        """Create the experiment; another worker (at a tracking server) may just have done so."""
        from mlflow.exceptions import MlflowException

        loc = self.artifact_location
        if loc and "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=loc,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def runs_url(self, study_name: str | None = None, run_id: str | None = None) -> str:
        """The MLflow UI's runs table of this experiment, filtered to one study's runs (or one
        run's page): at the tracking server's own address, or `mlflow ui`'s default for a local
        store."""
        base = redact_url(self.uri).rstrip("/") if self.uri.startswith(("http://", "https://")) else LOCAL_UI
        url = f"{base}/#/experiments/{self.connect()}/runs"
        if run_id:
            return f"{url}/{run_id}"
        if study_name:
            url += "?searchFilter=" + quote(f"tags.study_name = '{study_name}'", safe="")
        return url

    def ui_hint(self, study_name: str | None = None, run_id: str | None = None) -> str:
        """Where to look: the runs URL, and for a local store the command that serves it."""
        hint = f"MLflow runs: {self.runs_url(study_name, run_id)}"
        if self.uri.startswith(("http://", "https://")):
            return hint
        return f"{hint}  (serve them first: mlflow ui --backend-store-uri {redact_url(self.uri)} --host 127.0.0.1)"

    def _params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        ps = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(ps), 100):
            self.client.log_batch(run_id, params=ps[i:i + 100])

    def _metrics(self, run_id: str, metrics: Mapping[str, float | None]) -> list:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        return [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None]

    # --- the Tracker protocol of autorank.search.protocols ---
    def start_study(self, info: Mapping[str, Any]) -> str:
        info = redact_config(dict(info))  # no URL password in a param, a tag or config.yaml
        self.info = info
        c = self.client
        end_lost_runs(c, self.experiment_id)  # study runs whose workers all died (heartbeat.py)
        every_s = info.get("heartbeat_s")  # None: no heartbeat (search.heartbeat_s=null)
        self.parent_run_id, created = self.study_run(str(info.get("study_name")),
                                                     dict([beat_tag(every_s)]) if every_s else {})
        if every_s:  # the tag before the status: a run RUNNING again is never judged lost
            self.heartbeat = Heartbeat(c, self.parent_run_id, every_s)
        if not created:  # a resumed study, or another worker's: its params stay as first logged
            c.update_run(self.parent_run_id, status="RUNNING")
            return self.parent_run_id
        dev = info.get("device") or {}
        params = {"study_name": info.get("study_name"), "storage": info.get("storage"),
                  "sampler": info.get("sampler"), "budget_bytes": info.get("budget_bytes"),
                  "budget_mb": round(info.get("budget_bytes", 0) / MB, 3),
                  "n_trials": info.get("n_trials"), "timeout": info.get("timeout"),
                  "space.name": (info.get("space") or {}).get("name"),
                  **{f"device.{k}": v for k, v in dev.items()}}
        if self.log_config_params:
            params.update({f"config.{k}": v for k, v in _flatten(info.get("config") or {}).items()})
        self._params(self.parent_run_id, params)
        c.log_dict(self.parent_run_id, dict(info.get("config") or {}), "config.yaml")
        c.log_dict(self.parent_run_id, dict(info.get("space") or {}), "search_space.yaml")
        return self.parent_run_id

    def _study_runs(self, study_name: str) -> list:
        runs = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"tags.study_name = '{study_name}' and tags.`autorank.kind` = 'study'"))
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def study_run(self, study_name: str, tags: Mapping[str, str] = {}) -> tuple[str, bool]:
        """(the study's parent run id, whether this call created it): the earliest run tagged with
        the study's name; when there is none, one is created (with `tags` too), and kept unless
        another worker's was created first (then this one is deleted)."""
        runs = self._study_runs(study_name)
        if runs:
            return runs[0].info.run_id, False
        mine = self.client.create_run(self.experiment_id, run_name=self.run_name or f"study {study_name}",
                                      tags={"autorank.kind": "study", "study_name": study_name,
                                            **tags}).info.run_id
        first = self._study_runs(study_name)[0].info.run_id
        if first != mine:
            self.client.delete_run(mine)
        return first, first == mine

    def _trial_status(self, rec) -> str:
        if rec.state != "failed":
            return "FINISHED"
        return "KILLED" if (rec.fail_reason or "").startswith("interrupted") else "FAILED"

    def abort_study(self, interrupted) -> None:
        """SIGINT/SIGTERM: a KILLED run for each interrupted trial, and the study's run KILLED."""
        if self.parent_run_id is None:
            return
        for rec in interrupted:
            self.log_trial(rec)
        self._stop_heartbeat()
        self.client.set_terminated(self.parent_run_id, "KILLED")

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def log_trial(self, rec) -> str:
        from mlflow.entities import Param, RunTag

        c = self.client
        run = c.create_run(self.experiment_id, run_name=f"trial {rec.number}", tags={
            "mlflow.parentRunId": self.parent_run_id, "state": rec.state, "on_front": "false",
            "trial_number": str(rec.number), "study_name": str(self.info.get("study_name")),
            "autorank.kind": "trial"})
        rid = run.info.run_id
        self.trial_runs[rec.number] = rid
        metrics = {
            "val_accuracy": rec.val_accuracy if rec.state != "infeasible" else None,
            # held-out cross-entropy; for a language model per token, its perplexity exp(loss)
            "val_loss": rec.val_loss,
            "val_perplexity": None if rec.val_loss is None else math.exp(min(rec.val_loss, 700.0)),
            "predicted_peak_mb": rec.peak_mb, "predicted_peak_bytes": rec.predicted_peak_bytes,
            "predicted_activation_bytes": rec.predicted_activation_bytes,
            "measured_activation_bytes": rec.measured_activation_bytes,
            "train_flops": rec.flops, "measured_flops": rec.measured_flops,
            "predicted_step_time_s": rec.step_time_s, "wall_s": rec.wall_s,
            "train_wall_s": rec.train_wall_s}
        tags = [RunTag(k, str(v)[:5000]) for k, v in (("fail_reason", rec.fail_reason),
                ("source", rec.source), ("duplicate_of", rec.duplicate_of)) if v is not None]
        c.log_batch(rid, metrics=self._metrics(rid, metrics),
                    params=[Param(k[:250], v) for k, v in rec.choices.items()] +
                    [Param(f"hparam.{k}"[:250], f"{v:.6g}") for k, v in rec.hparams.items()], tags=tags)
        c.set_terminated(rid, self._trial_status(rec))
        return rid

    def end_study(self, result, plan_files: Mapping[int, Path]) -> None:
        from mlflow.entities import RunTag

        import optuna

        from autorank.search.result import study_budget_curve
        from autorank.tracking.budget_plot import plot_curve_png, write_curve_csv
        from autorank.tracking.front import plot_html, plot_png, write_table

        c = self.client
        pid = self.parent_run_id
        front_ids = {r.number for r in result.front}
        runs = dict(self.trial_runs)
        missing = front_ids - set(runs)
        if missing:  # front points from an earlier session of a resumed study
            for r in c.search_runs([self.experiment_id], max_results=5000, filter_string=(
                    f"tags.study_name = '{result.study_name}' and tags.`autorank.kind` = 'trial'")):
                n = int(r.data.tags.get("trial_number", -1))
                if n in missing:
                    runs.setdefault(n, r.info.run_id)
        for n in front_ids:
            if n in runs:
                c.set_tag(runs[n], "on_front", "true")
        best = result.best
        counts = {s: sum(r.state == s for r in result.trials)
                  for s in ("complete", "infeasible", "failed")}
        summary = {"n_trials": len(result.trials), "front_size": len(result.front),
                   "n_complete": counts["complete"], "n_infeasible": counts["infeasible"],
                   "n_failed": counts["failed"], "wall_s": result.wall_s,
                   **{f"time_{k}_s": v for k, v in result.time_split_s.items()}}
        if best is not None:
            summary.update(best_val_accuracy=best.val_accuracy, best_peak_mb=best.peak_mb,
                           best_train_flops=best.flops, best_trial=best.number,
                           best_refit_accuracy=best.refit_accuracy)
        if result.best_exact is not None:
            summary.update(best_exact_refit_accuracy=result.best_exact.refit_accuracy,
                           best_exact_val_accuracy=result.best_exact.val_accuracy)
        if result.best_plain is not None:
            summary.update(best_plain_refit_accuracy=result.best_plain.refit_accuracy,
                           best_plain_val_accuracy=result.best_plain.val_accuracy)
        for name, ref in (result.references or {}).items():
            key = name.replace(" ", "_")
            summary.update({f"{key}_refit_accuracy": ref["accuracy"],
                            f"{key}_peak_mb": ref["peak_bytes"] / MB})
        c.log_batch(pid, metrics=self._metrics(pid, summary),
                    tags=[RunTag("best_trial", str(best.number if best else None))])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_table(result.front, tmp / "front.csv", tmp / "front.json")
            write_table(result.trials, tmp / "trials.csv", tmp / "trials.json")
            title = f"{result.study_name}: accuracy vs predicted peak memory"
            study = result.study or optuna.load_study(study_name=result.study_name, storage=result.storage)
            refs = result.references or {}
            plot_html(study, result.trials, result.budget_bytes, tmp / "front.html", title, refs)
            plot_png(study, result.trials, result.budget_bytes, tmp / "front.png", title, refs)
            for name in ("front.csv", "front.json", "trials.csv", "trials.json", "front.html", "front.png"):
                c.log_artifact(pid, str(tmp / name), artifact_path="front")
            curve = study_budget_curve(result.trials, result.budget_bytes)
            write_curve_csv(curve, tmp / "budget_curve.csv")
            plot_curve_png(curve, result.budget_bytes, tmp / "budget_curve.png",
                           f"{result.study_name}: best accuracy vs budget")
            for name in ("budget_curve.csv", "budget_curve.png"):
                c.log_artifact(pid, str(tmp / name), artifact_path="budget")
        for n, p in sorted(plan_files.items()):
            c.log_artifact(pid, str(p), artifact_path="front/plans")
        if result.export_path is not None:
            c.log_artifact(pid, str(result.export_path), artifact_path="plan")
        self._stop_heartbeat()
        c.set_terminated(pid, "FINISHED")
        print(self.ui_hint(result.study_name), flush=True)

    # --- a single run (search=knapsack) ---
    def log_single_run(self, info: Mapping[str, Any], choices: Mapping[str, str],
                       metrics: Mapping[str, float | None], artifacts: Mapping[str, Path] = {}) -> str:
        info = redact_config(dict(info))  # no URL password in a param or config.yaml
        c = self.client
        end_lost_runs(c, self.experiment_id)  # a start in the experiment, as start_study's
        run = c.create_run(self.experiment_id, run_name=self.run_name or "knapsack",
                           tags={"autorank.kind": str(info.get("kind", "knapsack"))})
        rid = run.info.run_id
        dev = info.get("device") or {}
        params = {**{f"device.{k}": v for k, v in dev.items()},
                  "budget_bytes": info.get("budget_bytes"),
                  "space.name": (info.get("space") or {}).get("name"),
                  **{f"layer.{k}": v for k, v in choices.items()}}
        if self.log_config_params:
            params.update({f"config.{k}": v for k, v in _flatten(info.get("config") or {}).items()})
        self._params(rid, params)
        c.log_batch(rid, metrics=self._metrics(rid, metrics))
        c.log_dict(rid, dict(info.get("config") or {}), "config.yaml")
        for sub, p in artifacts.items():
            c.log_artifact(rid, str(p), artifact_path=sub)
        c.set_terminated(rid, "FINISHED")
        print(self.ui_hint(run_id=rid), flush=True)
        return rid
