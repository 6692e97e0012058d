"""No password of a storage or tracking URL in anything autorank prints or writes
(docs/RELIABILITY.md, `## Secrets`), and files written with ordinary permissions.

A known password is put where a user would put it - the storage and tracking URLs, on the command
line or in $AUTORANK_STORAGE - and looked for, byte for byte, in stdout, stderr, every file under
the run's root (Hydra's .hydra/*.yaml, the plan files, the Optuna and MLflow databases, the MLflow
artifacts) and the MLflow params and tags, for runs that succeed and runs that fail.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from autorank.redact import redact_config, redact_text, redact_url

PW = "Pw0ned-S3cret"


def _files_with(root: Path, needle: str = PW) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and needle.encode() in p.read_bytes())


def _run(root: Path, *args: str, env: dict | None = None, module: str = "autorank") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=root,
                          env={**os.environ, "AUTORANK_ROOT": str(root), **(env or {})},
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("text, expected", [
    ("postgresql://autorank:pw@host/db", "postgresql://autorank:***@host/db"),
    ("postgresql+psycopg://u:p@ss@h:5432/db?sslmode=require", "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    ("http://u:pw@127.0.0.1:5000", "http://u:***@127.0.0.1:5000"),
    ("sqlite:///file:/tmp/o.db?password=pw&uri=true", "sqlite:///file:/tmp/o.db?password=***&uri=true"),
    ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
    ("['s=postgresql://u:pw@h/db', 't=http://a:b@c']", "['s=postgresql://u:***@h/db', 't=http://a:***@c']"),
    # nothing secret: left as it is
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"), ("https://user@host/x", "https://user@host/x"),
    ("http://127.0.0.1:5000/#/runs", "http://127.0.0.1:5000/#/runs"), ("a@b.c: 3=4", "a@b.c: 3=4"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected
    assert redact_url(text) == expected and redact_url(None) is None


def test_redact_config_masks_every_string_and_keeps_the_rest():
    cfg = {"search": {"storage": f"postgresql://u:{PW}@h/db", "n_trials": 3},
           "tracking": {"uri": f"http://u:{PW}@h"}, "list": [f"x?token={PW}", 1.5, None]}
    out = redact_config(cfg)
    assert PW not in repr(out)
    assert out == {"search": {"storage": "postgresql://u:***@h/db", "n_trials": 3},
                   "tracking": {"uri": "http://u:***@h"}, "list": ["x?token=***", 1.5, None]}
    assert PW in cfg["search"]["storage"], "the input is not changed"


def test_log_records_are_redacted(tmp_path):
    import logging

    from autorank.redact import guard_logging

    handler = logging.FileHandler(tmp_path / "job.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        guard_logging()
        guard_logging()  # once is enough: no second filter
        assert len(handler.filters) == 1
        logging.getLogger("some.library").warning("connecting to %s", f"postgresql://u:{PW}@h/db")
    finally:
        root.removeHandler(handler)
        handler.close()
    assert (tmp_path / "job.log").read_text() == "connecting to postgresql://u:***@h/db\n"


def test_files_get_ordinary_permissions(tmp_path):
    """Not 0600 as tempfile.mkstemp would give: the umask decides, as for open()."""
    import torch

    from autorank.io import atomic_write
    from autorank.models import small_cnn
    from autorank.plan import Choice, Plan, save_base_weights

    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o002, 0o664)):
            os.umask(umask)
            paths = [Plan({"fc": Choice.full()}).save(tmp_path / f"plan{umask}.yaml"),
                     save_base_weights(small_cnn(num_classes=3), tmp_path / f"w{umask}.pt"),
                     atomic_write(tmp_path / f"t{umask}.txt", lambda t: t.write_text("x"))]
            assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode] * 3
    finally:
        os.umask(old)
    assert set(torch.load(tmp_path / f"w{0o022}.pt", weights_only=True)) >= {"fc.weight"}


def test_the_tracker_logs_no_password(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from autorank.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri=uri, artifact_location=str(tmp_path / "artifacts"))
    storage = f"postgresql://autorank:{PW}@db.example:5432/autorank"
    config = {"search": {"storage": storage}, "tracking": {"uri": f"http://autorank:{PW}@mlflow.example"}}
    rid = tracker.start_study({"study_name": "s", "storage": storage, "budget_bytes": 2**20, "config": config,
                               "space": {"name": "small"}, "device": {"name": "d"}})
    single = tracker.log_single_run({"config": config, "kind": "knapsack"}, {"fc": "full"}, {"acc": 0.5})
    client = MlflowClient(uri)
    for run_id in (rid, single):
        run = client.get_run(run_id)
        assert PW not in repr(run.data.params) + repr(run.data.tags)
        assert run.data.params["config.search.storage"] == "postgresql://autorank:***@db.example:5432/autorank"
    assert client.get_run(rid).data.params["storage"] == "postgresql://autorank:***@db.example:5432/autorank"
    assert _files_with(tmp_path) == []
    assert "autorank:***@" in (tmp_path / "artifacts").joinpath(rid, "artifacts", "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # MLflow makes a folder named after a file: URI's path in the cwd
    local = MlflowTracker(uri=f"sqlite:///file:{tmp_path}/m2.db?password={PW}&uri=true")
    hint = local.ui_hint("s")
    assert PW not in hint and "m2.db?password=***&uri=true" in hint
    assert PW not in capsys.readouterr().out


def test_a_run_refused_early_leaves_no_password(tmp_path):
    """A bad value stops the run at once: the password of both URLs is still in none of Hydra's
    saved files, the error line or the console."""
    p = _run(tmp_path, "+device=rpi4", f"search.storage=postgresql://autorank:{PW}@127.0.0.1:1/autorank",
             f"tracking.uri=http://autorank:{PW}@127.0.0.1:9", "search.n_trials=0")
    assert p.returncode == 2, p.stderr[-2000:]
    assert PW not in p.stdout + p.stderr
    assert _files_with(tmp_path) == []
    (overrides,) = tmp_path.glob("outputs/*/*/.hydra/overrides.yaml")
    text = overrides.read_text()
    assert "postgresql://autorank:***@127.0.0.1:1/autorank" in text and "http://autorank:***@127.0.0.1:9" in text
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(overrides.stat().st_mode) == 0o666 & ~umask, "rewritten with ordinary permissions"


def test_the_export_cli_prints_no_password(tmp_path):
    p = _run(tmp_path, "--storage", f"postgresql://autorank:{PW}@127.0.0.1:1/autorank", "--study", "s",
             "--out", str(tmp_path / "plan.yaml"), module="autorank.export")
    assert p.returncode == 2 and PW not in p.stdout + p.stderr, p.stderr
    assert p.stderr.startswith("error: cannot read the study from storage 'postgresql://autorank:***@127.0.0.1:1")
    assert "Traceback" not in p.stderr and _files_with(tmp_path) == []


@pytest.mark.slow
def test_a_successful_run_stores_no_password(tmp_path, pretrained_cache):
    """The storage URL from $AUTORANK_STORAGE (the documented way) and the tracking URL on the
    command line, each carrying the password as a URL option SQLite ignores: the run succeeds and
    the password is nowhere."""
    from mlflow.tracking import MlflowClient

    cache, args = pretrained_cache
    storage = f"sqlite:///file:{tmp_path}/optuna.db?password={PW}&uri=true"
    tracking = f"sqlite:///file:{tmp_path}/mlflow.db?password={PW}&uri=true"
    p = _run(tmp_path, "+device=rpi4", *args, f"paths.cache_dir={cache}", "device.budget_mb=2",
             "search.trial_steps=4", "search.n_trials=2", "search.refit_top=1", "search.references=false",
             f"tracking.uri='{tracking}'", env={"AUTORANK_STORAGE": storage})
    assert p.returncode == 0, p.stderr[-3000:]
    assert PW not in p.stdout + p.stderr and "password=***" in p.stdout
    assert _files_with(tmp_path) == []
    assert (tmp_path / "optuna.db").exists() and list(tmp_path.glob("outputs/*/*/plan.yaml"))
    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3  # the study and its 2 trials
    assert all(PW not in repr(r.data.params) + repr(r.data.tags) for r in runs)
    (parent,) = [r for r in runs if r.data.tags.get("autorank.kind") == "study"]
    assert parent.data.params["storage"] == storage.replace(PW, "***")
    (cfg,) = tmp_path.glob("outputs/*/*/.hydra/config.yaml")
    assert "${oc.env:AUTORANK_STORAGE" in cfg.read_text()  # Hydra saved the interpolation, not the URL


@pytest.mark.slow
@pytest.mark.parametrize("where", ["storage", "tracking"])
def test_a_failed_run_leaves_no_password(tmp_path, pretrained_cache, where):
    """A server that refuses the connection: the run fails (after the profile), with the password
    in no line, file or report - Hydra's "Error executing job with overrides" included."""
    cache, args = pretrained_cache
    url = (f"search.storage=postgresql://autorank:{PW}@127.0.0.1:1/autorank" if where == "storage"
           else f"tracking.uri=http://autorank:{PW}@127.0.0.1:9")
    p = _run(tmp_path, "+device=rpi4", *args, f"paths.cache_dir={cache}", "device.budget_mb=2",
             "search.trial_steps=4", "search.n_trials=2", url,
             env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert PW not in out and "Error executing job with overrides" not in out
    if where == "tracking":
        assert "autorank:***@127.0.0.1:9" in p.stderr  # MLflow's own message, masked
    assert _files_with(tmp_path) == []
