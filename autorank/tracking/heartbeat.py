"""Which workers still hold a study's MLflow run, and what happens to a run whose workers died.

Each worker that holds the study's run (created or resumed by MlflowTracker.start_study) writes a
heartbeat tag on it, `autorank.heartbeat.<host>.<pid>` = {"worker", "t" (unix time), "every_s"},
when it takes the run and then every `every_s` seconds from a daemon thread; a worker that ends
the run (FINISHED, or KILLED by SIGINT/SIGTERM) removes its own tag. A worker killed outright
(SIGKILL, the OOM killer, power loss) cannot end its run: its tag stops changing.

The next start of any worker in the experiment (a study of its own or another) ends every RUNNING
study run whose workers all missed LOST_AFTER heartbeats: status KILLED, its end time the last
heartbeat, and a tag LOST_TAG saying which worker stopped and when. A run that the next worker
of the same study resumes goes on RUNNING and keeps that tag (the run's history). A run without
any heartbeat tag (no heartbeat configured: search.heartbeat_s=null) is never judged.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Mapping

BEAT_PREFIX = "autorank.heartbeat."
LOST_TAG = "autorank.lost_worker"
LOST_AFTER = 3  # missed heartbeats, the grace Optuna's trial heartbeat gets too (search.storage)


def worker_name() -> str:
    """This process as a user finds it: `host pid N`."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def beat_tag(every_s: float, now: float | None = None) -> tuple[str, str]:
    """(key, value) of this worker's heartbeat tag at time `now`."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())  # MLflow's tag key characters
    value = {"worker": worker_name(), "t": round(time.time() if now is None else now, 3), "every_s": every_s}
    return f"{BEAT_PREFIX}{host}.{os.getpid()}", json.dumps(value)


def beats_of(tags: Mapping[str, str]) -> list[dict] | None:
    """The heartbeats in a run's tags ([] when none), None when one cannot be read."""
    out = []
    for k, v in tags.items():
        if k.startswith(BEAT_PREFIX):
            try:
                b = json.loads(v)
                out.append({"key": k, "worker": str(b["worker"]), "t": float(b["t"]), "every_s": float(b["every_s"])})
            except (ValueError, TypeError, KeyError):
                return None
    return out


def lost_reason(beats: list[dict], now: float, by: str) -> str | None:
    """Why a RUNNING run whose heartbeats are `beats` is lost, or None while a worker may live."""
    if not beats or any(now - b["t"] < LOST_AFTER * b["every_s"] for b in beats):
        return None
    last = max(beats, key=lambda b: b["t"])
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["t"]))
    return (f"worker {last['worker']} stopped without ending this run: no heartbeat since {when} "
            f"({now - last['t']:.0f} s, {LOST_AFTER} heartbeats of {last['every_s']:g} s missed: SIGKILL, "
            f"out of memory or power loss); ended KILLED at the start of worker {by}")


def end_lost_runs(client, experiment_id: str, now: float | None = None) -> dict[str, str]:
    """End the experiment's lost study runs (module doc); returns {run id: reason}."""
    now = time.time() if now is None else now
    runs = client.search_runs([experiment_id], max_results=1000, filter_string=(
        "tags.`autorank.kind` = 'study' and attributes.status = 'RUNNING'"))
    out = {}
    for run in runs:
        beats = beats_of(run.data.tags)
        reason = lost_reason(beats, now, worker_name()) if beats else None
        if reason is None:
            continue
        rid = run.info.run_id
        client.set_tag(rid, LOST_TAG, reason)
        for b in beats:
            client.delete_tag(rid, b["key"])
        client.set_terminated(rid, "KILLED", end_time=int(max(b["t"] for b in beats) * 1000))
        out[rid] = reason
    return out


class Heartbeat:
    """This worker's heartbeat on run `run_id`: the tag written now, then every `every_s` from a
    daemon thread (a write that fails, the server away for a moment, is tried at the next beat);
    stop() ends the thread and removes the tag."""

    def __init__(self, client, run_id: str, every_s: float):
        self.client, self.run_id, self.every_s = client, run_id, float(every_s)
        self.key, value = beat_tag(self.every_s)
        client.set_tag(run_id, self.key, value)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autorank-mlflow-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.client.set_tag(self.run_id, *beat_tag(self.every_s))
            except Exception:  # noqa: BLE001 - the main thread meets and reports a lost server
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 10)
        self.client.delete_tag(self.run_id, self.key)
