"""The writers and the study's storage under hostile input (docs/RELIABILITY.md): nothing written
over an input, no password printed or saved, and storage trouble as one line.

Three tables, each case run as a user would (a subprocess of `python -m autorank` or
`python -m autorank.export` in a folder of its own, copied from one template):
- WRITER_CASES: an output that is the study's storage or another input, and an export pointed at
  a database that is not an Optuna study: exit 2, one error line, every file's bytes unchanged.
- URL_FORMS: storage and tracking URLs with a password in every form a user may write it: the
  password is in nothing redact returns (nor in Hydra's saved files, the console or the MLflow
  params), and the host and database still are.
- STORAGE_CASES: a study that is not autorank's, a tampered stored record, a storage of random
  bytes, on a read-only folder or a full disk, a PostgreSQL server that does not answer: exit 2,
  one line, the study's bytes unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

SMALL = ["+device=rpi4", "model=small_cnn", "data.input_size=16", "data.batch_size=32", "trainer.steps=6",
         "space=small", "search.n_trials=3", "hydra.run.dir={d}/run"]
FSIZE_LIMIT = 32 * 1024  # bytes a process of the full-disk cases may write to one file


# --- the template folder ---------------------------------------------------------------------

def _set_attr(db: Path, *, trial: int | None, key: str, value) -> None:
    """Write a user attr of study 's' (a trial's, or the study's for trial=None) behind Optuna's
    back, as a hand edit or another tool would."""
    con = sqlite3.connect(db)
    with con:
        if trial is None:
            con.execute("UPDATE study_user_attributes SET value_json=? WHERE key=? AND study_id="
                        "(SELECT study_id FROM studies WHERE study_name='s')", (json.dumps(value), key))
            if con.total_changes == 0:
                con.execute("INSERT INTO study_user_attributes (study_id, key, value_json) SELECT study_id, ?, ? "
                            "FROM studies WHERE study_name='s'", (key, json.dumps(value)))
        else:
            con.execute("UPDATE trial_user_attributes SET value_json=? WHERE key=? AND trial_id=(SELECT t.trial_id "
                        "FROM trials t JOIN studies s ON t.study_id=s.study_id WHERE s.study_name='s' "
                        "AND t.number=?)", (json.dumps(value), key, trial))
    con.close()


def _record(db: Path, trial: int) -> dict:
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    (value,) = con.execute("SELECT value_json FROM trial_user_attributes a JOIN trials t ON a.trial_id=t.trial_id "
                           "WHERE a.key='autorank' AND t.number=?", (trial,)).fetchone()
    con.close()
    return json.loads(value)


def _template(folder: Path) -> Path:
    """An autorank study 's' and a plain Optuna study 'kept' in outputs/optuna.db, a checkpoint,
    an MLflow-like database, a file of random bytes, an empty file and tampered copies of the
    study."""
    import optuna
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from search_fakes import DEVICE, FakeWorkload, study_args

    from autorank.models import small_cnn
    from autorank.search.study import run_study

    (folder / "outputs").mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, st, kw = study_args(folder / "outputs", n_trials=4)
    run_study(FakeWorkload(), DEVICE, space, st, **kw)
    db = folder / "outputs" / "optuna.db"
    kept = optuna.create_study(storage=f"sqlite:///{db}", study_name="kept")
    kept.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    torch.save(small_cnn(num_classes=4).state_dict(), folder / "ckpt.pt")
    con = sqlite3.connect(folder / "mlflow.db")  # MLflow's own tables, as its store has them
    con.executescript("CREATE TABLE alembic_version (version_num VARCHAR(32));"
                      "CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT);"
                      "CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, experiment_id INTEGER);")
    con.close()
    (folder / "rand.db").write_bytes(hashlib.sha512(b"random").digest() * 64)
    (folder / "empty.db").write_bytes(b"")
    for name, trial, key, value in (
            ("acc", 0, "autorank", {**_record(db, 0), "val_accuracy": "abc"}),
            ("plan", 1, "autorank", {**_record(db, 1), "plan": "layers: everything"}),
            ("list", 2, "autorank", ["not", "a", "record"]),
            ("refit", None, "refit", {"0": {"accuracy": "high"}})):
        shutil.copy(db, folder / f"tampered_{name}.db")
        _set_attr(folder / f"tampered_{name}.db", trial=trial, key=key, value=value)
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.relative_to(folder).parts[0] == "run"}


# --- how a case runs ---------------------------------------------------------------------------

def _full_disk() -> None:  # preexec_fn: a file may not grow past FSIZE_LIMIT (EFBIG, as a full disk)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'


@dataclass(frozen=True)
class Case:
    tool: str  # app | export
    args: tuple[str, ...]  # {d}: the case folder
    expect: tuple[str, ...]  # words of the one error line
    wrap: str = ""  # "": as it is; "read-only": outputs/ mounted read-only; "full disk": RLIMIT_FSIZE
    storage: str = "sqlite:///{d}/outputs/optuna.db"  # the export CLI's --storage
    absent: tuple[str, ...] = field(default=())  # strings no output may hold (a password)

    def argv(self, d: Path) -> list[str]:
        args = [a.replace("{d}", str(d)) for a in self.args]
        if self.tool == "app":
            keys = {a.split("=", 1)[0] for a in args}
            base = [a.replace("{d}", str(d)) for a in SMALL if a.split("=", 1)[0] not in keys]
            argv = [sys.executable, "-m", "autorank", *base, *args]
        else:
            keys = set(args)
            base = [a.replace("{d}", str(d)) for a in ("--storage", self.storage) if "--storage" not in keys]
            study = [] if "--study" in keys else ["--study", "s"]
            argv = [sys.executable, "-m", "autorank.export", *base, *study, *args]
        if self.wrap == "read-only":
            return ["unshare", "-rm", "sh", "-c", READ_ONLY, "sh", str(d / "outputs"), *argv]
        return argv


def _run_cases(cases: dict[str, Case], wanted: list[str], base: Path) -> dict:
    """case -> (folder, files before, CompletedProcess), two at a time."""
    if not wanted:
        return {}
    template = _template(base / "template")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORANK_")}
    jobs = {}
    for i, name in enumerate(wanted):
        folder = base / f"case{i:02d}"
        shutil.copytree(template, folder)
        (folder / "db-link").symlink_to(folder / "outputs" / "optuna.db")
        os.link(folder / "outputs" / "optuna.db", folder / "db-hard-link")
        jobs[name] = (folder, _snapshot(folder))

    def one(name):
        folder, _ = jobs[name]
        case = cases[name]
        return subprocess.run(case.argv(folder), cwd=folder, env={**env, "AUTORANK_ROOT": str(folder)},
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                              preexec_fn=_full_disk if case.wrap == "full disk" else None)

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(wanted, pool.map(one, wanted)))
    return {name: (*jobs[name], done[name]) for name in wanted}


def _selected(request, cases: dict) -> list[str]:
    return sorted({it.callspec.params["case"] for it in request.session.items
                   if getattr(it, "callspec", None) and it.callspec.params.get("case") in cases})


def _check_one_line_exit_2_nothing_changed(runs, name: str, case: Case) -> None:
    folder, before, p = runs[name]
    if case.wrap == "read-only" and "mount" in p.stderr and "autorank" not in p.stderr:
        pytest.skip(f"no private read-only mount here: {p.stderr.strip()[:200]}")
    lines = [s for s in p.stderr.splitlines() if s.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for word in case.expect:
        assert word.replace("{d}", str(folder)) in lines[0], lines[0]
    for secret in case.absent:
        assert secret not in p.stdout + p.stderr
    assert _snapshot(folder) == before, "a file was changed"
    new = {q.relative_to(folder).as_posix() for q in folder.rglob("*") if q.is_file()} - set(before)
    assert all(n.startswith("run/") for n in new), new


# --- class 1: never write over an input or the storage ---------------------------------------

STORAGE_IS = ("is the study's storage", "writing there would destroy it")
WRITER_CASES: dict[str, Case] = {
    "export --out = storage": Case("export", ("--out", "{d}/outputs/optuna.db"), ("--out {d}/outputs/optuna.db", *STORAGE_IS)),
    "export --out = storage, another spelling": Case(
        "export", ("--out", "{d}/outputs/../outputs/./optuna.db"), STORAGE_IS),
    "export --out = storage, a link": Case("export", ("--out", "{d}/db-link"), STORAGE_IS),
    "export --out = storage, a hard link": Case("export", ("--out", "{d}/db-hard-link"), STORAGE_IS),
    "export --trial 0 --out = storage": Case("export", ("--trial", "0", "--out", "{d}/outputs/optuna.db"),
                                             STORAGE_IS),
    "export an MLflow database": Case("export", (), ("mlflow.db is a database of another program",
                                                     "experiments", "not an Optuna study's"),
                                      storage="sqlite:///{d}/mlflow.db"),
    "export random bytes": Case("export", (), ("rand.db is not a SQLite database",), storage="sqlite:///{d}/rand.db"),
    "export an empty file": Case("export", (), ("empty.db holds no Optuna study",), storage="sqlite:///{d}/empty.db"),
    "app export.path = storage": Case("app", ("export.path={d}/outputs/optuna.db",),
                                      ("export.path={d}/outputs/optuna.db is the study's storage (search.storage)",)),
    "app export.data_path = storage": Case("app", ("export.data_path={d}/outputs/optuna.db",),
                                           ("export.data_path=", "is the study's storage")),
    "app export.path = checkpoint": Case("app", ("model.checkpoint={d}/ckpt.pt", "export.path={d}/ckpt.pt"),
                                         ("export.path=", "is the model checkpoint")),
    "app export.data_path = export.path": Case("app", ("export.path={d}/p.yaml", "export.data_path={d}/p.yaml"),
                                               ("export.data_path=", "is export.path")),
    "app tracking store = storage": Case("app", ("tracking.uri=sqlite:///{d}/outputs/optuna.db",),
                                         ("tracking.uri=", "is the study's storage")),
    "app storage = an MLflow database": Case("app", ("search.storage=sqlite:///{d}/mlflow.db",),
                                             ("search.storage", "mlflow.db is a database of another program")),
}


@pytest.fixture(scope="module")
def writer_runs(request, tmp_path_factory):
    return _run_cases(WRITER_CASES, _selected(request, WRITER_CASES), tmp_path_factory.mktemp("writers"))


@pytest.mark.parametrize("case", list(WRITER_CASES))
def test_no_writer_writes_over_an_input_or_the_storage(writer_runs, case):
    _check_one_line_exit_2_nothing_changed(writer_runs, case, WRITER_CASES[case])
