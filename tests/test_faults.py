"""Faults as a user meets them, on the real app (`python -m autorank`, a tiny workload): SIGINT,
SIGTERM and SIGKILL mid-trial, then the same command again; and many workers started at once on
one fresh PostgreSQL database (marker `postgres`: AUTORANK_TEST_PG=postgresql://user@host:port/db
of a server where that user may create databases; .ci/run starts one).

Every run shares one root (the pretrained checkpoint and the profile cached once) and has its own
study storage and MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# the smoke preset (conf/experiment/smoke.yaml) under a 2 MB budget, one pretraining epoch, no
# refits, a heartbeat each second
TINY = ["+device=rpi4", "+experiment=smoke", "device.budget_mb=2", "trainer.pretrain_epochs=1",
        "search.refit_steps=null", "search.heartbeat_s=1"]
PG = os.environ.get("AUTORANK_TEST_PG")
# A trial that a signal sent 0.5 s after it starts surely lands in: 1000 steps of this workload are
# several seconds of training on the 2-core box; 50 steps were over before the signal on a faster
# CI machine, and the signal hit the next trial.
LONG = "search.trial_steps=1000"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The shared root, its checkpoint pretrained and its profile cached by one short run."""
    root = tmp_path_factory.mktemp("faults")
    p = start(root, "warm", "search.n_trials=1", "search.trial_steps=2")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return root


def start(root: Path, name: str, *args: str, storage: str | None = None, mlflow: str | None = None) -> subprocess.Popen:
    """The app on `name`'s study storage and MLflow store (`mlflow`: another run's store)."""
    storage = storage or f"sqlite:///{root}/{name}.db"
    # one thread each: three workers of two threads on two cores ran 20x slower than one (spinning)
    env = {**os.environ, "AUTORANK_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "autorank", *TINY, f"search.storage={storage}",
                             f"tracking.uri=sqlite:///{root}/{mlflow or name}-mlflow.db", *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def trials(storage: str) -> list:
    import optuna

    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def wait_running(storage: str, n: int = 1, timeout: float = 300) -> list[int]:
    """The numbers of the RUNNING trials once there are n of them."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            try:
                with engine.connect() as c:
                    rows = c.execute(sqlalchemy.text("SELECT number FROM trials WHERE state = 'RUNNING'")).all()
            except sqlalchemy.exc.SQLAlchemyError:
                rows = []  # not created yet
            if len(rows) >= n:
                return sorted(r[0] for r in rows)
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError(f"no {n} running trials in {timeout} s")


def mlflow_runs(root: Path, name: str) -> tuple[list, list]:
    """(study runs, trial runs) of the store."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/{name}-mlflow.db")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000)
    kind = lambda k: [r for r in runs if r.data.tags.get("autorank.kind") == k]  # noqa: E731
    return kind("study"), kind("trial")


def assert_finished_exactly(storage: str, n: int) -> list:
    from optuna.trial import TrialState

    from autorank.search.workers import Census

    ts = trials(storage)
    c = Census.of(ts)
    assert c.counted == n and not c.running and not c.waiting, [(t.number, t.state) for t in ts]
    assert {t.state for t in ts} <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED}
    return ts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_trial_then_the_same_command_finishes(root, sig):
    from optuna.trial import TrialState

    name = sig.name.lower()
    storage = f"sqlite:///{root}/{name}.db"
    args = ["search.n_trials=3", LONG]
    p = start(root, name, *args)
    (n,) = wait_running(storage)[:1]
    time.sleep(0.5)
    p.send_signal(sig)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=120)
    assert time.monotonic() - t0 < 30  # stopped within seconds (most of it the interpreter's exit)
    assert p.returncode == 128 + sig, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("autorank:")]
    assert lines == [f"autorank: {sig.name} received: interrupted during trial {n}; run the same command to "
                     "continue"], err[-3000:]
    assert "Traceback" not in err and "Received SIGTERM" not in err and "KeyboardInterrupt" not in err
    ts = trials(storage)
    assert ts[n].state == TrialState.FAIL and ts[n].user_attrs["autorank"]["fail_reason"] == f"interrupted by {sig.name}"
    (copy,) = [t for t in ts if t.system_attrs.get("retry_history") == [n]]
    assert copy.state == TrialState.WAITING and copy.user_attrs.get("source") == ts[n].user_attrs.get("source")
    parents, trial_runs = mlflow_runs(root, name)
    assert [r.info.status for r in parents] == ["KILLED"]
    assert {r.data.tags["trial_number"]: r.info.status for r in trial_runs}[str(n)] == "KILLED"
    # the same command: the interrupted plan trained, exactly 3 counted, the runs ended
    p = start(root, name, *args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    ts = assert_finished_exactly(storage, 3)
    assert ts[copy.number].state == TrialState.COMPLETE
    parents, trial_runs = mlflow_runs(root, name)
    assert [r.info.status for r in parents] == ["FINISHED"]  # one parent, found again by the study's name
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    assert sorted(r.info.status for r in trial_runs) == ["FINISHED"] * 3 + ["KILLED"]


def test_sigkill_mid_trial_then_the_same_command_retries_it(root):
    from optuna.trial import TrialState

    storage = f"sqlite:///{root}/kill.db"
    args = ["search.n_trials=3", LONG]
    p = start(root, "kill", *args)
    (n,) = wait_running(storage)[:1]
    time.sleep(0.5)
    p.kill()
    p.communicate(timeout=60)
    killed_at = time.time()
    assert p.returncode == -signal.SIGKILL
    assert trials(storage)[n].state == TrialState.RUNNING  # what SIGKILL leaves: no handler runs
    (parent,), _ = mlflow_runs(root, "kill")
    (beat,) = [json.loads(v) for k, v in parent.data.tags.items() if k.startswith("autorank.heartbeat.")]
    assert parent.info.status == "RUNNING" and beat["worker"].endswith(f" pid {p.pid}") and beat["every_s"] == 1
    # the next start in the MLflow experiment (another study) ends the dead worker's run KILLED,
    # once 3 of its 1 s heartbeats are missed
    time.sleep(max(0.0, killed_at + 3.5 - time.time()))
    other = start(root, "kill-other", "search.n_trials=1", "search.trial_steps=2", "search.study_name=other",
                  mlflow="kill")
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    parents, _ = mlflow_runs(root, "kill")
    by_study = {r.data.tags["study_name"]: r for r in parents}
    dead = by_study.pop(parent.data.tags["study_name"])
    assert dead.info.run_id == parent.info.run_id and dead.info.status == "KILLED"
    assert dead.info.end_time == int(beat["t"] * 1000)  # its last heartbeat
    assert dead.data.tags["autorank.lost_worker"].startswith(f"worker {beat['worker']} stopped without ending this run")
    assert [r.info.status for r in by_study.values()] == ["FINISHED"]
    p = start(root, "kill", *args)  # its heartbeat is 1 s: stale after 3 s, then failed and retried
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    ts = assert_finished_exactly(storage, 3)
    assert ts[n].state == TrialState.FAIL
    (copy,) = [t for t in ts if t.system_attrs.get("retry_history") == [n]]
    assert copy.state == TrialState.COMPLETE
    assert all(copy.params[k] == v for k, v in ts[n].params.items())  # the same plan
    parents, trial_runs = mlflow_runs(root, "kill")
    parents = [r for r in parents if r.data.tags["study_name"] != "other"]
    # the same run resumed and finished; it keeps the tag saying a worker was lost
    assert [(r.info.run_id, r.info.status) for r in parents] == [(parent.info.run_id, "FINISHED")]
    assert parents[0].data.tags["autorank.lost_worker"] == dead.data.tags["autorank.lost_worker"]
    trial_runs = [r for r in trial_runs if r.data.tags["study_name"] != "other"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}


@pytest.fixture
def pg_db():
    """A fresh database on AUTORANK_TEST_PG's server, dropped after the test."""
    if not PG:
        pytest.skip("no PostgreSQL server: set AUTORANK_TEST_PG=postgresql://user@host:port/db (.ci/run does)")
    import psycopg

    name = f"autorank_test_{uuid.uuid4().hex[:8]}"
    admin = PG.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_three_workers_at_once_on_a_fresh_postgres_database(root, pg_db):
    args = ["search.n_trials=6", "search.trial_steps=10"]
    procs = [start(root, "pg3", *args, storage=pg_db) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    ts = assert_finished_exactly(pg_db, 6)
    assert len({t.number for t in ts}) == len(ts)
    complete = [t.number for t in ts if t.state.name == "COMPLETE"]
    parents, trial_runs = mlflow_runs(root, "pg3")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # never duplicated
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    assert sorted(int(r.data.tags["trial_number"]) for r in trial_runs) == sorted(complete)


@pytest.mark.postgres
def test_a_worker_killed_mid_trial_is_retried_by_the_others(root, pg_db):
    from optuna.trial import TrialState

    args = ["search.n_trials=5", LONG]
    procs = [start(root, "pgkill", *args, storage=pg_db) for _ in range(3)]
    wait_running(pg_db, n=3)  # every worker in a trial
    time.sleep(0.2)
    procs[0].kill()
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[0].returncode == -signal.SIGKILL
    assert [p.returncode for p in procs[1:]] == [0, 0], [o[1][-2000:] for o in outs[1:]]
    ts = assert_finished_exactly(pg_db, 5)
    dead = [t for t in ts if t.state == TrialState.FAIL]
    assert len(dead) == 1
    (copy,) = [t for t in ts if t.system_attrs.get("retry_history") == [dead[0].number]]
    assert copy.state == TrialState.COMPLETE
