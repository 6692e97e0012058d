"""Interrupted trials, dead workers' trials and many workers on one study, with the fake workload
(quick). The same faults on the real app, as a user meets them (signals to a subprocess, and
PostgreSQL): tests/test_faults.py."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from autorank.errors import ConfigError
from autorank.interrupt import Interrupted
from autorank.search.storage import check_driver, open_storage
from autorank.search.study import run_study
from autorank.search.workers import Census, surplus_reason
from search_fakes import DEVICE, LAYERS, FakeWorkload, study_args


def states(storage, name="s"):
    return [t.state for t in optuna.load_study(study_name=name, storage=storage).trials]


def trained_keys(wl):
    return [tuple(c[n] for n in LAYERS) for c in wl.calls]


class InterruptAt(FakeWorkload):
    """Raises Interrupted (as the SIGINT handler does) in its `at`-th fine-tuning call."""

    def __init__(self, at: int, signum: int = signal.SIGINT):
        super().__init__()
        self.at, self.signum = at, signum

    def finetune(self, plan, settings, **kw):
        if len(self.calls) == self.at:
            self.calls.append(None)  # started, never finished
            raise Interrupted(self.signum)
        return super().finetune(plan, settings, **kw)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_trial_fails_is_queued_again_and_resume_finishes_exactly(tmp_path, signum):
    wl = InterruptAt(0, signum)  # the first trained trial: the knapsack warm start
    space, st, kw = study_args(tmp_path, n_trials=6)
    with pytest.raises(Interrupted) as e:
        run_study(wl, DEVICE, space, st, **kw)
    assert e.value.trial == 0 and e.value.exit_code == 128 + signum
    assert "interrupted during trial 0; run the same command to continue" in e.value.message()
    study = optuna.load_study(study_name="s", storage=st.storage)
    t0 = study.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["source"] == "knapsack"
    assert t0.user_attrs["autorank"]["fail_reason"] == f"interrupted by {signal.Signals(signum).name}"
    copy = [t for t in study.trials if t.system_attrs.get("retry_history") == [0]]
    assert len(copy) == 1 and copy[0].state == TrialState.WAITING and copy[0].params == t0.params
    # the same command again: exactly 6 counted trials, the knapsack plan trained, none left over
    wl2 = FakeWorkload()
    res = run_study(wl2, DEVICE, space, st, **kw)
    final = states(st.storage)
    assert final.count(TrialState.COMPLETE) == 6 and final.count(TrialState.FAIL) == 1
    assert TrialState.RUNNING not in final and TrialState.WAITING not in final
    assert {r.number for r in res.trials if r.source == "knapsack" and r.state == "complete"} == {copy[0].number}
    assert len(trained_keys(wl2)) == len(set(trained_keys(wl2)))  # no plan trained twice


def test_dead_workers_trial_is_failed_by_heartbeat_and_retried(tmp_path):
    """A worker SIGKILLed mid-trial leaves its trial RUNNING with an old heartbeat: the next run
    fails it after the grace period (3 heartbeats), queues it again and trains it."""
    space, st, kw = study_args(tmp_path, n_trials=4, heartbeat_s=1)
    storage = open_storage(st.storage, heartbeat_s=1)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial({"l0": "full", "l1": "frozen", "l2": "frozen"}, user_attrs={"source": "dead"})
    dead = study.ask()  # popped by a worker that then died: RUNNING, one heartbeat, never again
    storage.record_heartbeat(dead._trial_id)
    wl = FakeWorkload()
    t0 = time.monotonic()
    res = run_study(wl, DEVICE, space, st, **kw)
    final = optuna.load_study(study_name="s", storage=st.storage).trials
    assert final[0].state == TrialState.FAIL
    retry = [t for t in final if t.system_attrs.get("retry_history") == [0]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].user_attrs["source"] == "dead"
    assert Census.of(final).counted == 4 and not Census.of(final).running and not Census.of(final).waiting
    assert {"l0": "full", "l1": "frozen", "l2": "frozen"} in wl.calls
    assert time.monotonic() - t0 >= 3  # it waited for the grace period, not less
    assert len(res.trials) == 5


def test_workers_at_once_finish_exactly_n_trials(tmp_path):
    """Three workers (threads here; processes on PostgreSQL in test_faults.py) on one SQLite
    study: exactly n_trials counted, each plan trained once across them, nothing left over."""

    class Slow(FakeWorkload):
        lock = threading.Lock()
        all_calls: list = []

        def finetune(self, plan, settings, **kw):
            time.sleep(0.05)
            with self.lock:
                self.all_calls.append(dict(plan.meta["choices"]))
            return super().finetune(plan, settings, **kw)

    space, st, kw = study_args(tmp_path, n_trials=9)
    errors = []

    def worker(seed):
        try:
            run_study(Slow(), DEVICE, space, st, **{**kw, "sampler": optuna.samplers.RandomSampler(seed=seed)})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    trials = optuna.load_study(study_name="s", storage=st.storage).trials
    c = Census.of(trials)
    assert c.counted == 9 and not c.running and not c.waiting
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    keys = [tuple(ch[n] for n in LAYERS) for ch in Slow.all_calls]
    assert len(keys) == len(set(keys))  # no plan trained twice, by any worker
    assert len({t.number for t in trials}) == len(trials)


def test_surplus_trials_are_not_run():
    def t(number, state, fixed=None, retry=None):
        return optuna.trial.FrozenTrial(
            number=number, state=state, value=None, values=[1.0] if state == TrialState.COMPLETE else None,
            datetime_start=None, datetime_complete=None, params={}, distributions={}, user_attrs={},
            system_attrs={**({"fixed_params": fixed} if fixed else {}),
                          **({"retry_history": retry} if retry else {})},
            intermediate_values={}, trial_id=number)

    done = [t(0, TrialState.COMPLETE), t(1, TrialState.FAIL), t(2, TrialState.WAITING, retry=[1])]
    assert Census.of(done).counted == 1  # the failed trial was queued again: its copy counts
    trials = done + [t(3, TrialState.RUNNING), t(4, TrialState.RUNNING)]
    assert surplus_reason(trials, 3, target=2) is None  # 1 counted before it
    assert "n_trials=2 reached" in surplus_reason(trials, 4, target=2)  # 1 counted + trial 3 running
    assert surplus_reason(trials, 4, target=3) is None
    same = [t(0, TrialState.WAITING, fixed={"l0": "full"}), t(1, TrialState.RUNNING, fixed={"l0": "full"})]
    assert "enqueued as trial 0" in surplus_reason(same, 1, target=10)  # two workers enqueued it
    # trial 3 was skipped as a twin of trial 2, then trial 2's worker died: 2's copy must still train
    x = {"l0": "full"}
    died = [t(2, TrialState.FAIL, fixed=x), t(3, TrialState.PRUNED, fixed=x), t(5, TrialState.RUNNING, fixed=x, retry=[2])]
    assert surplus_reason(died, 5, target=10) is None
    assert "enqueued as trial 3" in surplus_reason(died[:1] + [t(3, TrialState.COMPLETE, fixed=x)] + died[2:], 5, 10)


def test_n_trials_total_false_adds_new_trials_after_a_failure(tmp_path):
    space, st, kw = study_args(tmp_path, n_trials=3)
    run_study(FakeWorkload(), DEVICE, space, st, **kw)
    res = run_study(FakeWorkload(), DEVICE, space, dataclasses.replace(st, n_trials=2, n_trials_total=False), **kw)
    assert res.n_new == 2 and Census.of(optuna.load_study(study_name="s", storage=st.storage).trials).counted == 5


def test_postgres_url_without_its_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'autorank\[postgres\]'") as e:
        check_driver("postgresql://autorank:secret@127.0.0.1/db")
    assert "secret" not in str(e.value)
    check_driver("sqlite:///x.db")  # nothing needed


CREATE = """
import sys, time
from autorank.search.storage import open_storage
from autorank.tracking.mlflow_tracker import MlflowTracker
t = float(sys.argv[1]); time.sleep(max(0.0, t - time.time()))
import optuna
optuna.create_study(study_name="s", storage=open_storage(sys.argv[2]), load_if_exists=True)
MlflowTracker(sys.argv[3], experiment="e").connect()
print("ok")
"""


def test_workers_started_at_once_create_the_sqlite_stores_once(tmp_path):
    """Unlocked, 2 of 3 such processes crashed (Optuna: table already exists; MLflow: Online
    migration expected to match one row)."""
    start = time.time() + 8  # after every interpreter has imported
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, str(start), f"sqlite:///{tmp_path}/o.db",
                               f"sqlite:///{tmp_path}/m.db"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-1500:] for o in outs]
    assert len(optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/o.db")) == 1


def test_one_parent_run_per_study_even_when_two_workers_create_one(tmp_path, monkeypatch):
    from mlflow.entities import ViewType

    from autorank.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path}/m.db"
    a, b = MlflowTracker(uri, experiment="e"), MlflowTracker(uri, experiment="e")
    first, created = a.study_run("s1")
    assert created and b.study_run("s1") == (first, False)  # found by the study's name
    assert b.study_run("s2")[0] != first  # another study: its own
    # b created its own at the same moment, before it could see a's: it keeps a's, deletes its own
    calls = []
    real = MlflowTracker._study_runs
    monkeypatch.setattr(MlflowTracker, "_study_runs",
                        lambda self, n: real(self, n) if calls.append(n) or len(calls) > 1 else [])
    assert b.study_run("s1") == (first, False)
    runs = b.client.search_runs([b.connect()], filter_string="tags.study_name = 's1'")
    assert [r.info.run_id for r in runs] == [first]
    deleted = b.client.search_runs([b.connect()], filter_string="tags.study_name = 's1'", run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == 1 and deleted[0].info.run_id != first


def test_sqlite_path_reads_sqlalchemys_url_forms(tmp_path):
    """A `file:PATH?...&uri=true` URL names PATH (once it made a stray 'file:' folder in the cwd)."""
    from pathlib import Path

    from autorank.search.storage import sqlite_path

    assert sqlite_path(f"sqlite:///{tmp_path}/o.db") == tmp_path / "o.db"
    assert sqlite_path(f"sqlite:///file:{tmp_path}/o.db?password=x&uri=true") == tmp_path / "o.db"
    assert sqlite_path("sqlite:///rel/o.db") == Path("rel/o.db")
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("postgresql://u@h/db") is None
