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

SMALL = ["+device=rpi4", "+experiment=smoke", "search.n_trials=3", "hydra.run.dir={d}/run"]  # conf/experiment/smoke.yaml
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
            ("plan", 3, "autorank", {**_record(db, 3), "plan": "layers: everything"}),
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
                                               ("export.data_path=", "is the file export.path names")),
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


# --- class 2: no password printed or saved ----------------------------------------------------

# (URL, its secret, what must still show): each secret also in its percent-encoded form
URL_FORMS = [
    ("postgresql://autorank:s3cr/et@db.example:5432/optuna", "s3cr/et", ("db.example:5432", "/optuna")),
    ("postgresql://autorank:s3cr et@db.example/optuna", "s3cr et", ("db.example", "/optuna")),
    ("postgresql://autorank:s3cr@et@db.example/optuna", "s3cr@et", ("db.example", "/optuna")),
    ("postgresql+psycopg://autorank:p@ss/w rd@db.example:5432/optuna?sslmode=require", "p@ss/w rd",
     ("db.example:5432", "/optuna", "sslmode=require")),
    ("postgresql://autorank:p%40ss%2Fw0rd@db.example/optuna", "p%40ss%2Fw0rd", ("db.example", "/optuna")),
    ("postgresql://autorank:it's@db.example/optuna", "it's", ("db.example", "/optuna")),
    ("postgresql://autorank@db.example/optuna?sslpassword=Ss1Secret&sslmode=verify-full", "Ss1Secret",
     ("db.example", "/optuna", "sslmode=verify-full")),
    ("postgresql://autorank@db.example/optuna?password=Q1secret", "Q1secret", ("db.example", "/optuna")),
    ("mysql+pymysql://autorank:My5ecret@db.example/optuna?charset=utf8mb4", "My5ecret",
     ("db.example", "/optuna", "charset=utf8mb4")),
    ("postgresql+psycopg://autorank:V6secret@[::1]:5432/optuna", "V6secret", ("[::1]:5432", "/optuna")),
    ("sqlite:///file:/data/optuna.db?password=Sq1secret&uri=true", "Sq1secret", ("/data/optuna.db", "uri=true")),
    ("http://autorank:Ht7secret@mlflow.example:5000", "Ht7secret", ("mlflow.example:5000",)),
    ("https://mlflow.example/api?access_token=Tk8secret&x=1", "Tk8secret", ("mlflow.example/api", "x=1")),
    ("https://mlflow.example/?api_key=Ak9secret", "Ak9secret", ("mlflow.example",)),
    ("host=db.example dbname=optuna password=Lq2secret", "Lq2secret", ("host=db.example", "dbname=optuna")),
    ("host=db.example dbname=optuna password='Lq 3secret'", "Lq 3secret", ("host=db.example", "dbname=optuna")),
]


def _leaks(text: str, secret: str) -> list[str]:
    forms = {secret, quote(secret, safe=""), secret.replace(" ", "%20"), secret.replace(" ", "+")}
    forms |= {f for f in secret.replace("'", " ").split() if len(f) >= 4}  # no piece of it either
    return [f for f in forms if f in text]


def _redacted_everywhere(url: str) -> dict[str, str]:
    """url through every way autorank prints or saves one."""
    import yaml

    from autorank.app import _redact_yaml
    from autorank.redact import redact_config, redact_text, redact_url

    folded = yaml.safe_dump({"search": {"storage": url, "n_trials": 3}}, width=20)  # long values fold
    return {"redact_url": redact_url(url),
            "an error line": redact_text(f"error: cannot read the study from storage {url!r}: refused"),
            "a log line": redact_text(f"connecting to {url} as user x@y.z"),
            "overrides.yaml": redact_text(f"- search.storage={url}\n- tracking.uri={url}\n"),
            "config.yaml": _redact_yaml(folded),
            "MLflow params": repr(redact_config({"search": {"storage": url}, "list": [url, 1]}))}


@pytest.mark.parametrize("url, secret, kept", URL_FORMS, ids=[u for u, _, _ in URL_FORMS])
def test_a_password_is_never_printed_or_saved(url, secret, kept):
    assert secret in url  # the table's own sanity
    for where, text in _redacted_everywhere(url).items():
        assert _leaks(text, secret) == [], (where, text)
        if where not in ("config.yaml", "a log line"):
            for part in kept:
                assert part in text, (where, part, text)
        assert "***" in text, (where, text)


APP_URLS = [URL_FORMS[3], URL_FORMS[6], URL_FORMS[1]]  # '@', '/' and ' ' together; ?sslpassword=; a space


@pytest.mark.parametrize("url, secret, kept", APP_URLS, ids=["at-slash-space", "sslpassword", "space"])
def test_the_app_saves_and_prints_no_password(tmp_path, url, secret, kept):
    """A run refused early (search.n_trials=0): Hydra's .hydra/*.yaml, its log, the console and
    every other file under the root hold no piece of the password."""
    tracking = url.replace("db.example", "mlflow.example")
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", f"search.storage='{url}'",
                        f"tracking.uri='{tracking}'", "search.n_trials=0"], cwd=tmp_path,
                       env={**os.environ, "AUTORANK_ROOT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "search.n_trials=0" in p.stderr, p.stderr[-2000:]
    assert _leaks(p.stdout + p.stderr, secret) == []
    saved = {q: q.read_text(errors="replace") for q in tmp_path.rglob("*") if q.is_file()}
    assert any(q.name == "overrides.yaml" for q in saved)
    for q, text in saved.items():
        assert _leaks(text, secret) == [], q
    overrides = next(t for q, t in saved.items() if q.name == "overrides.yaml")
    assert all(part in overrides for part in kept) and "***" in overrides


def test_the_mlflow_params_hold_no_password(tmp_path):
    from mlflow.tracking import MlflowClient

    from autorank.tracking import MlflowTracker

    url, secret, _ = URL_FORMS[3]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri=uri, artifact_location=str(tmp_path / "artifacts"))
    config = {"search": {"storage": url}, "tracking": {"uri": URL_FORMS[6][0]}}
    rid = tracker.start_study({"study_name": "s", "storage": url, "budget_bytes": 2**20, "config": config,
                               "space": {"name": "small"}, "device": {"name": "d"}})
    run = MlflowClient(uri).get_run(rid)
    text = repr(run.data.params) + repr(run.data.tags)
    assert _leaks(text, secret) == [] and _leaks(text, URL_FORMS[6][1]) == []
    assert "db.example:5432/optuna" in run.data.params["storage"]
    for q in tmp_path.rglob("*"):
        if q.is_file():
            assert _leaks(q.read_bytes().decode("latin-1"), secret) == [], q


# --- class 5: storage trouble is one line, and the study is kept ------------------------------

DAMAGED = ("stored record is damaged", "changed outside autorank")
STORAGE_CASES: dict[str, Case] = {
    "export a study that is not autorank's": Case("export", ("--study", "kept"),
                                                  ("study 'kept'", "is not an autorank study", "python -m autorank")),
    "export, a record's accuracy is text": Case("export", (), ("trial 0's", *DAMAGED, "val_accuracy is 'abc'"),
                                                storage="sqlite:///{d}/tampered_acc.db"),
    "export, a record's plan is text": Case("export", ("--list",), ("trial 3's", *DAMAGED, "plan is"),
                                            storage="sqlite:///{d}/tampered_plan.db"),
    "export, a record is a list": Case("export", (), ("holds a damaged record", "changed outside autorank"),
                                       storage="sqlite:///{d}/tampered_list.db"),
    "export, a refit figure is text": Case("export", (), ("holds a damaged record", "changed outside autorank"),
                                           storage="sqlite:///{d}/tampered_refit.db"),
    "app storage of random bytes": Case("app", ("search.storage=sqlite:///{d}/rand.db",),
                                        ("search.storage", "rand.db is not a SQLite database")),
    "app storage a directory": Case("app", ("search.storage=sqlite:///{d}/outputs",),
                                    ("search.storage", "is a directory")),
    "app storage on a read-only folder": Case("app", (), ("search.storage=", "cannot be written", "Read-only"),
                                              wrap="read-only"),
    "app storage on a full disk": Case("app", (), ("search.storage", "cannot write in", "free space"),
                                       wrap="full disk"),
    "app PostgreSQL refuses": Case("app", ("search.storage=postgresql://autorank:Pg4secret@127.0.0.1:1/autorank",),
                                   ("cannot connect to postgresql://autorank:***@127.0.0.1:1/autorank",
                                    "start the database server"), absent=("Pg4secret",)),
}


@pytest.fixture(scope="module")
def storage_runs(request, tmp_path_factory):
    return _run_cases(STORAGE_CASES, _selected(request, STORAGE_CASES), tmp_path_factory.mktemp("storage"))


@pytest.mark.parametrize("case", list(STORAGE_CASES))
def test_storage_trouble_is_one_line_and_keeps_the_study(storage_runs, case):
    _check_one_line_exit_2_nothing_changed(storage_runs, case, STORAGE_CASES[case])


FILL_DISK = """
import os, resource, signal, sys
import optuna
from autorank.search.storage import open_storage, storage_error
db = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as a full disk gives ENOSPC
size = os.path.getsize(db)
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
optuna.logging.set_verbosity(optuna.logging.ERROR)
try:
    study = optuna.load_study(study_name="s", storage=open_storage("sqlite:///" + db, heartbeat_s=None))
    for i in range(50):
        study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0, 1.0], user_attrs={"big": "x" * 100000}))
except Exception as e:
    err = storage_error(e)
    print(err if err is not None else repr(e), file=sys.stderr)
    sys.exit(2 if err is not None else 1)
"""


def test_a_disk_that_fills_during_the_study_is_one_line_and_keeps_the_study(tmp_path):
    """The database cannot grow (a file size limit, as a full disk): the write fails, the
    failure is one line saying what to do, and the study reads back byte for byte as it was."""
    import optuna

    db = tmp_path / "optuna.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s", directions=["maximize"] * 3)
    study.add_trial(optuna.trial.create_trial(values=[0.9, 2.0, 3.0], user_attrs={"kept": True}))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    p = subprocess.run([sys.executable, "-c", FILL_DISK, str(db)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("the study's storage failed") and "free space" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    assert [(t.values, t.user_attrs) for t in trials] == [([0.9, 2.0, 3.0], {"kept": True})]


WORKER = """
import sys, optuna
from autorank.search.storage import check_storage, open_storage
url = sys.argv[1]
check_storage(url)
optuna.create_study(study_name="s", storage=open_storage(url, heartbeat_s=None), load_if_exists=True,
                    directions=["maximize"] * 3)
print("ok")
"""


def test_workers_starting_at_once_on_a_fresh_storage_are_not_refused(tmp_path):
    """The read-only look of one worker may see the tables another is creating: a database with
    some of Optuna's tables is Optuna's, and a writer's commit is waited for."""
    url = f"sqlite:///{tmp_path}/fresh.db"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-1500:] for _, e in outs]
    assert all(o.strip() == "ok" for o, _ in outs)
