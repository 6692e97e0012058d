"""The study's storage, safe for many workers: created once, with a heartbeat on every trial.

    storage = open_storage("postgresql://autorank@127.0.0.1/autorank", heartbeat_s=10)

- Creation: N workers started at once on a fresh database all create Optuna's tables, and all
  but one crash (PostgreSQL: UniqueViolation on pg_type; SQLite: "table ... already exists").
  Here the creation runs under a lock: a PostgreSQL advisory lock (the server's own, so it holds
  across machines), a file lock beside a SQLite file (one machine, as SQLite is), and for any other
  database a few retries.
- Heartbeat: every running trial writes a heartbeat each `heartbeat_s`; a trial whose heartbeat is
  older than `grace_s` (its worker was killed, or its machine lost power) is failed by the next
  worker that starts a trial, and queued again (RetryTrial: up to MAX_RETRY times, so a plan that
  kills its worker every time is given up, and counts as failed).
- SQLite: every transaction begins IMMEDIATE (see open_storage), so that two workers never pop
  the same enqueued trial.
- A PostgreSQL URL without its driver is a one-line ConfigError naming the extra to install.
"""

from __future__ import annotations

import importlib
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy
from filelock import FileLock

from autorank.errors import ConfigError

HEARTBEAT_S = 10  # conf/search/optuna.yaml: search.heartbeat_s
MAX_RETRY = 2  # times a trial whose worker died is queued again
LOCK_TIMEOUT_S = 300
T = TypeVar("T")


def check_driver(url: str) -> None:
    """A PostgreSQL URL needs a driver SQLAlchemy can load: psycopg 3 for postgresql:// (and
    postgresql+psycopg://), psycopg2 for postgresql+psycopg2://."""
    scheme = url.split("://", 1)[0].lower()
    if not scheme.startswith(("postgresql", "postgres")):
        return
    module = "psycopg2" if scheme.endswith("psycopg2") else "psycopg"
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"a {scheme}:// storage needs the PostgreSQL driver {module}, which is not installed: "
            "pip install 'autorank[postgres]'") from None


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (SQLAlchemy's forms: a path, or `file:PATH?...&uri=true`),
    None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0].removeprefix("file:")
    return Path(rest) if rest and rest != ":memory:" else None


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held while a store's schema may be created or migrated (see the module doc)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    if url.split("://", 1)[0].lower().startswith("postgres"):
        key = zlib.crc32(b"autorank schema") & 0x7FFFFFFF  # one lock per database
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield


def with_retries(fn: Callable[[], T], what: str, tries: int = 5, wait_s: float = 0.5) -> T:
    """fn(), tried again after a database error (a concurrent worker created the same rows)."""
    for i in range(tries):
        try:
            return fn()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.ProgrammingError):
            if i == tries - 1:
                raise
            time.sleep(wait_s * (i + 1))
    raise AssertionError(what)  # not reached


class RetryTrial:
    """A failed trial queued again: a WAITING copy with its params (or its enqueued fixed_params)
    and its `source`; system attrs `failed_trial` (the first of the series) and `retry_history`,
    as Optuna's RetryHeartbeatStaleTrialCallback writes them. Ours because that one also copies
    the failed trial's constraints, which Optuna then refuses to set again ("already set"), and
    its record (its figures belong to the failed run, not the copy's)."""

    def __init__(self, max_retry: int = MAX_RETRY):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", ()), trial.number]
        if len(history) > self.max_retry:
            return
        system = {k: v for k, v in trial.system_attrs.items() if k == "fixed_params"}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={k: v for k, v in trial.user_attrs.items() if k == "source"},
            system_attrs={**system, "failed_trial": history[0], "retry_history": history}))


def open_storage(url: str, *, heartbeat_s: int | None = HEARTBEAT_S) -> optuna.storages.BaseStorage | str:
    """An RDBStorage for a database URL (heartbeat on unless heartbeat_s is None; grace period
    3 heartbeats); any other Optuna storage URL is left to Optuna."""
    check_driver(url)
    if url.split("://", 1)[0].split("+", 1)[0].lower() not in ("sqlite", "postgresql", "postgres",
                                                              "mysql"):
        return url  # e.g. a journal file: Optuna's own (no heartbeat)
    sqlite = sqlite_path(url) is not None
    # SQLite: pysqlite's own BEGIN off (isolation_level None), BEGIN IMMEDIATE on (below)
    engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kw = {}
        if heartbeat_s:
            kw = dict(heartbeat_interval=int(heartbeat_s), grace_period=3 * int(heartbeat_s),
                      heartbeat_stale_trial_callback=RetryTrial())
        with creation_lock(url):
            storage = with_retries(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kw),
                                   "create the study's storage")
    if sqlite:
        # Optuna hands a WAITING trial to one worker with SELECT ... FOR UPDATE, which SQLite
        # ignores: two workers could pop the same enqueued trial (measured: "Cannot tell a
        # COMPLETE trial"). Each transaction taking SQLite's write lock at its start makes that
        # read-then-write atomic (SQLAlchemy's documented pysqlite recipe).
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _begin_immediate(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
