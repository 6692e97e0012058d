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
- Before any work (check_storage): a SQLite file is looked at read-only (a file that is not SQLite,
  or a database of another program, e.g. MLflow's, is refused before Optuna creates its tables in
  it), its folder must take a write, and a PostgreSQL server must answer. A database error later
  in the run (a full disk, a file made read-only, the server gone) is one line (storage_error).
  SQLite and PostgreSQL write each change in a transaction: a failed write leaves the study as
  it was.
"""

from __future__ import annotations

import errno
import importlib
import os
import secrets
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy

from autorank.errors import ConfigError
from autorank.io import check_output, creation_lock, sqlite_path  # the lock: tracking's store too
from autorank.redact import redact_text, redact_url

HEARTBEAT_S = 10  # conf/search/optuna.yaml: search.heartbeat_s
MAX_RETRY = 2  # times a trial whose worker died is queued again
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


# Optuna's own tables (alembic_version left out: MLflow has one too). A database holding none of
# them is another program's; one holding some is Optuna's, perhaps being created by another worker.
OPTUNA_TABLES = frozenset({"studies", "study_directions", "study_user_attributes", "study_system_attributes",
                           "trials", "trial_user_attributes", "trial_system_attributes", "trial_params",
                           "trial_values", "trial_intermediate_values", "trial_heartbeats", "version_info"})
SQLITE_MAGIC = b"SQLite format 3\x00"
PROBE_BYTES = 64 * 1024  # written (and removed) beside a SQLite storage: a full disk shows at once


def sqlite_tables(path: Path, what: str = "search.storage") -> set[str] | None:
    """The table names of an existing SQLite file, read without changing a byte (sqlite3 opened
    with mode=ro); None for an empty file (a new database). ConfigError when the file is not a
    SQLite database or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if not head:
            return None
        if head != SQLITE_MAGIC:
            raise ConfigError(f"{what}: {path} is not a SQLite database (it does not start with SQLite's "
                              "header): point it at an Optuna study's database, or at a new file")
        # read-only: nothing is created or changed; a writer's commit is waited for, as Optuna does
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"{what}: cannot read the SQLite database {path} ({e}): check the file, "
                          "or point it at another database") from e


def check_optuna_sqlite(path: Path, what: str = "search.storage") -> bool:
    """Whether the SQLite file holds Optuna's tables (False: an empty or new database);
    ConfigError when it holds another program's tables (Optuna would add its own to them)."""
    tables = {t for t in sqlite_tables(path, what) or () if not t.startswith("sqlite_")} if path.is_file() else None
    if not tables:
        return False
    if not OPTUNA_TABLES & tables:
        shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
        raise ConfigError(f"{what}: {path} is a database of another program (tables: {shown}), not an "
                          "Optuna study's: point it at an Optuna database, or at a new file")
    return True


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


def _probe_write(folder: Path, what: str) -> None:
    """Write PROBE_BYTES to a new file in `folder` and remove it: a full disk (or a file size
    limit) is found before the work, not at the first trial."""
    probe = folder / f".autorank-space-test-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {folder} ({e.strerror or e}): free space there, or "
                          f"point {what} at another disk") from e
    finally:
        probe.unlink(missing_ok=True)


def check_storage(url: str, *, what: str = "search.storage", connect_timeout_s: int = 5) -> None:
    """Before any work, for a run that will write the study: a SQLite file must be SQLite and
    Optuna's (or new), its folder writable with room to grow, the file itself writable; a
    PostgreSQL server must answer. One-line ConfigError saying what to do; nothing is written
    to the database (see the module doc)."""
    check_driver(url)
    path = sqlite_path(url)
    if path is not None:
        path = path.expanduser()
        if path.is_dir():
            raise ConfigError(f"{what}: {path} is a directory: name a database file, e.g. "
                              f"sqlite:///{path / 'optuna.db'}")
        check_optuna_sqlite(path, what)
        check_output(path, what=what, error=ConfigError)  # the folder takes a new file (read-only?)
        if path.is_file() and not os.access(path, os.W_OK):
            raise ConfigError(f"{what}: {path} is read-only: make it writable, or point {what} at a "
                              "copy on a writable disk")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        _probe_write(folder, what)
        return
    if url.split("://", 1)[0].lower().startswith("postgres"):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": connect_timeout_s})
        try:
            with engine.connect():
                pass
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise ConfigError(f"{what}: cannot connect to {redact_url(url)} ({_first_line(e)}): start "
                              "the database server, or fix the host, port and credentials in the URL") from e
        finally:
            engine.dispose()


def _first_line(e: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's '(Background on this error ...)' lines."""
    cause = getattr(e, "orig", None) or e
    text = " ".join(str(cause).split("\n")[0].split()) or type(cause).__name__
    return redact_text(text)


# (what the driver says, lower case) -> what it means and what to do; first match wins
_DB_ERRORS = (
    (("database or disk is full", "disk i/o error", "no space left", "file too large"),
     "the disk is full, a file size limit was reached or the disk failed: free space there (or point "
     "search.storage at another disk), and run the same command again to resume"),
    (("readonly database", "read-only", "unable to open database file"),
     "it cannot be written (a read-only file or folder): make it writable, or point search.storage at "
     "a writable disk"),
    (("file is not a database", "database disk image is malformed"),
     "it is not a readable SQLite database: point search.storage at an Optuna study's database or at "
     "a new file"),
    (("connection refused", "could not connect", "connection to server", "server closed the connection",
      "timeout expired", "could not translate host name"),
     "the database server does not answer: start it (or fix the host and port in search.storage), and "
     "run the same command again to resume"),
)


def storage_error(exc: BaseException) -> ConfigError | None:
    """The one-line ConfigError for a database error of the study's storage found in `exc` or
    its causes (see _DB_ERRORS), or None: then it is not one, and keeps its traceback. The
    failed statement was rolled back: the study holds what it held before it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.DatabaseError, sqlite3.Error)) or (
                isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS)):
            text = str(getattr(exc, "orig", None) or exc).lower()
            for needles, advice in _DB_ERRORS:
                if any(n in text for n in needles):
                    return ConfigError(f"the study's storage failed ({_first_line(exc)}): {advice}")
        exc = exc.__cause__ or exc.__context__
    return None
