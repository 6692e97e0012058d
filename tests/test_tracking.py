"""MLflow: parent run per study, nested run per trial, front artifacts (tmp sqlite store)."""

import json
import math

import pytest

from mlflow.tracking import MlflowClient

from autorank.search.study import run_study
from autorank.tracking import MlflowTracker
from search_fakes import DEVICE, FakeWorkload, study_args


def test_study_logged_to_mlflow(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker = MlflowTracker(uri, experiment="t", artifact_location=str(tmp_path / "mlruns" / "art"))
    wl = FakeWorkload(fail_on={"l0": "frozen", "l1": "frozen", "l2": "full"})
    space, st, kw = study_args(tmp_path, n_trials=12, export_path=tmp_path / "plan.yaml")
    cfg = {"seed": 0, "model": {"_target_": "x.y", "width": 8}}
    res = run_study(wl, DEVICE, space, st, tracker=tracker, config=cfg, **kw)

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("t")
    # the UI opens the experiment on its runs table, and the tracker says where that is
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    url = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?searchFilter=tags.study_name%20%3D%20%27s%27"
    assert tracker.runs_url("s") == url and url in capsys.readouterr().out
    parent = c.get_run(tracker.parent_run_id)
    p = parent.data.params
    assert p["study_name"] == "s" and p["storage"] == st.storage
    assert p["sampler"] == "RandomSampler" and p["budget_bytes"] == str(DEVICE.budget_bytes)
    assert p["device.name"] == "fakedev" and p["config.model.width"] == "8"
    assert p["space.name"] == "fake"
    assert parent.data.metrics["n_trials"] == 12
    assert parent.data.metrics["front_size"] == len(res.front)
    assert parent.data.metrics["best_val_accuracy"] == res.best.val_accuracy

    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 12
    by_n = {int(r.data.tags["trial_number"]): r for r in children}
    for rec in res.trials:
        run = by_n[rec.number]
        assert run.data.tags["state"] == rec.state
        assert run.data.tags["on_front"] == ("true" if rec.on_front else "false")
        assert run.data.params == rec.choices
        if rec.state != "failed":
            assert run.data.metrics["predicted_peak_bytes"] == rec.predicted_peak_bytes
            assert run.data.metrics["train_flops"] == rec.flops
            assert run.data.metrics["predicted_step_time_s"] == rec.flops / 1e9
        if rec.state == "complete":
            assert run.data.metrics["val_accuracy"] == rec.val_accuracy
            assert run.data.metrics["measured_activation_bytes"] == rec.measured_activation_bytes
            # the held-out loss beside the accuracy (FakeWorkload: 1 - accuracy), its perplexity
            assert run.data.metrics["val_loss"] == pytest.approx(1.0 - rec.val_accuracy)
            assert run.data.metrics["val_perplexity"] == pytest.approx(math.exp(1.0 - rec.val_accuracy))
        if rec.state == "infeasible":
            assert "val_accuracy" not in run.data.metrics
    failed = [r for r in children if r.data.tags["state"] == "failed"]
    assert len(failed) == 1 and failed[0].data.tags["fail_reason"] == "RuntimeError: loss is NaN"
    assert failed[0].info.status == "FAILED"

    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "front")}
    assert {f"front/{n}" for n in ("front.csv", "front.json", "front.html", "front.png")} <= arts
    plans = {a.path for a in c.list_artifacts(parent.info.run_id, "front/plans")}
    assert plans == {f"front/plans/trial_{r.number:04d}.yaml" for r in res.front}
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "plan")] == ["plan/plan.yaml"]
    local = c.download_artifacts(parent.info.run_id, "front/front.json", str(tmp_path / "dl"))
    table = json.load(open(local))
    html = open(c.download_artifacts(parent.info.run_id, "front/front.html", str(tmp_path / "dl"))).read()
    assert "Infeasible Trial" in html and "Best Trial" in html  # Optuna's constraint-aware plot
    assert f"budget {DEVICE.budget_bytes / 2**20:.1f} MB" in html and "knapsack" in html
    assert sorted(row["trial"] for row in table) == sorted(r.number for r in res.front)
    assert all(row["state"] == "complete" and row["on_front"] for row in table)
    assert str(tmp_path / "mlruns" / "art") in parent.info.artifact_uri


def small_study():
    """Three trials of (accuracy, peak MB, FLOPs): two feasible, one over budget."""
    import optuna

    from autorank.search.records import records_from_study

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for i, (values, over) in enumerate([((0.5, 1.0, 1e9), -1.0), ((0.6, 2.0, 2e9), -1.0),
                                        ((0.0, 3.0, 3e9), 1.0)]):
        t = study.ask()
        t.set_user_attr("source", "knapsack" if i == 0 else None)
        t.set_user_attr("autorank", {"state": "complete", "choices": {"l0": "full", "l1": "frozen"},
                                     "val_accuracy": values[0], "predicted_peak_bytes": int(values[1] * 2**20),
                                     "flops": int(values[2])})
        t.set_constraint("peak_minus_budget_bytes", over)
        study.tell(t, values)
    return study, records_from_study(study)


def test_front_files_are_written_atomically(tmp_path, monkeypatch):
    from autorank.tracking import front

    study, recs = small_study()
    assert [r.state for r in recs] == ["complete", "complete", "infeasible"]
    assert [r.on_front for r in recs] == [True, True, False]
    csv_p, json_p, png, html = (tmp_path / n for n in ("front.csv", "front.json", "front.png", "front.html"))
    front.write_table(recs, csv_p, json_p)
    front.plot_png(study, recs, int(2.5 * 2**20), png)
    front.plot_html(study, recs, int(2.5 * 2**20), html)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json_p.read_text())[0]["choices"] == "l0=full"
    assert csv_p.read_text().splitlines()[0].startswith("trial,state,on_front")
    text = html.read_text()
    assert "plotly" in text and "budget 2.5 MB" in text and "knapsack" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.csv", "front.html", "front.json", "front.png"]

    # a writer that dies half-way leaves the previous files whole and no temp file behind
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import csv as csv_mod

    class Dying(csv_mod.DictWriter):
        def writerows(self, rows):
            super().writerows(rows[:1])
            raise OSError("disk full")

    monkeypatch.setattr(front.csv, "DictWriter", Dying)
    with pytest.raises(OSError, match="disk full"):
        front.write_table(recs[:1], csv_p, json_p)
    import matplotlib.figure

    def dying_savefig(self, fname, **kw):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dying_savefig)
    with pytest.raises(OSError, match="disk full"):
        front.plot_png(study, recs[:1], 2**20, png)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_existing_experiment_gets_the_kind_tag_and_a_server_url(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp_id = c.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    assert "mlflow.experimentKind" not in c.get_experiment(exp_id).tags
    tracker = MlflowTracker(uri, experiment="old")
    assert tracker.connect() == exp_id
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    server = MlflowTracker("http://mlflow.example:5000/", experiment="old")
    server.connect = lambda: "7"  # no server here: the URL is built from the tracking URI alone
    assert server.runs_url() == "http://mlflow.example:5000/#/experiments/7/runs"
    assert server.runs_url(run_id="abc") == "http://mlflow.example:5000/#/experiments/7/runs/abc"
    assert server.ui_hint("s") == ("MLflow runs: http://mlflow.example:5000/#/experiments/7/runs"
                                   "?searchFilter=tags.study_name%20%3D%20%27s%27")


def test_profile_save_removes_its_temp_file_on_error(tmp_path, monkeypatch):
    from autorank.search.profile import Profile

    path = tmp_path / "profile.json"
    path.write_text("old")
    prof = Profile.__new__(Profile)
    monkeypatch.setattr(Profile, "to_json", lambda self: "new")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        prof.save(path)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    monkeypatch.setattr(Profile, "to_json", lambda self: "new")
    prof.save(path)
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_refit_references_and_budget_curve_logged(tmp_path):
    import csv
    import dataclasses

    from autorank.search.budget import budget_curve

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker = MlflowTracker(uri, experiment="t", artifact_location=str(tmp_path / "mlruns" / "art"))
    wl = FakeWorkload()
    space, st, kw = study_args(tmp_path, n_trials=12, trial_steps=40, refit_steps=120,
                               export_path=tmp_path / "plan.yaml")
    space = dataclasses.replace(space, hparams={"lr": {"low": 0.003, "high": 0.1, "log": True}})
    res = run_study(wl, DEVICE, space, st, tracker=tracker, **kw)
    c = MlflowClient(uri)
    parent = c.get_run(tracker.parent_run_id)
    m = parent.data.metrics
    assert m["best_refit_accuracy"] == res.best.refit_accuracy
    assert m["plain_reference_refit_accuracy"] == res.references["plain reference"]["accuracy"]
    assert m["head_alone_peak_mb"] == res.references["head alone"]["peak_bytes"] / 2**20
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "budget")}
    assert arts == {"budget/budget_curve.csv", "budget/budget_curve.png"}
    rows = list(csv.DictReader(open(c.download_artifacts(parent.info.run_id, "budget/budget_curve.csv",
                                                         str(tmp_path / "dl")))))
    assert int(rows[-1]["budget_bytes"]) == DEVICE.budget_bytes
    at_budget = budget_curve(res.trials, [DEVICE.budget_bytes])[0]
    assert float(rows[-1]["any_accuracy"]) == at_budget.any_accuracy == \
        max(r.val_accuracy for r in res.trials if r.feasible)
    assert [float(r["budget_mb"]) for r in rows] == sorted(float(r["budget_mb"]) for r in rows)
    front = list(csv.DictReader(open(c.download_artifacts(parent.info.run_id, "front/front.csv",
                                                          str(tmp_path / "dl")))))
    refit = {int(r["trial"]): r["refit_accuracy"] for r in front}
    assert refit[res.best.number] and float(refit[res.best.number]) == res.best.refit_accuracy
    trial_run = c.search_runs([parent.info.experiment_id], filter_string="tags.trial_number = '5'")[0]
    assert float(trial_run.data.params["hparam.lr"]) == pytest.approx(res.trials[5].hparams["lr"], rel=1e-5)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_place_labels_gives_disjoint_boxes_for_one_point():
    from autorank.tracking.front import place_labels

    anchors, sizes = [(100.0, 50.0)] * 4, [(60.0, 8.0), (30.0, 8.0), (45.0, 8.0), (60.0, 8.0)]
    offsets = place_labels(anchors, sizes, gap=4.0)
    assert offsets[0] == (4.0, 4.0)  # the first takes right-above
    assert offsets[1] == (4.0, -12.0)  # right-below: the gap and its own height under the point
    assert offsets[2] == (-49.0, 4.0)  # left-above: its width and the gap left of the point
    boxes = [(x + dx, y + dy, x + dx + w, y + dy + h) for (x, y), (dx, dy), (w, h) in zip(anchors, offsets, sizes)]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_front_png_marks_untrained_plans_on_the_memory_axis_and_labels_do_not_overlap(tmp_path):
    """The warm-start plans of the default job: the knapsack plan and uniform ASI 0.8 land on the
    same point; 'full every candidate' is over the budget, never trained (accuracy 0.0 stored)."""
    import optuna

    from autorank.search.records import records_from_study
    from autorank.tracking import front

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    plans = [("knapsack", 0.61, 1.0, -1.0), ("uniform asi@0.8:b", 0.61, 1.0, -1.0), ("full last 2", 0.55, 1.6, -1.0),
             ("head alone", 0.55, 1.55, -1.0), ("full every candidate", 0.0, 3.0, 1.0), (None, 0.7, 2.0, -1.0)]
    for source, acc, mb, over in plans:
        t = study.ask()
        t.set_user_attr("source", source)
        t.set_user_attr("autorank", {"state": "complete", "choices": {"l0": "full"}, "val_accuracy": acc,
                                     "predicted_peak_bytes": int(mb * 2**20), "flops": int(mb * 1e9)})
        t.set_constraint("peak_minus_budget_bytes", over)
        study.tell(t, (acc, mb, mb * 1e9))
    recs = records_from_study(study)
    assert front.untrained_points(recs) == [("full every candidate", 3.0)]
    plotted = front.trained_study(study).trials
    assert len(plotted) == 5 and min(t.values[0] for t in plotted) == 0.55  # no point at accuracy 0
    boxes = front.plot_png(study, recs, int(2.5 * 2**20), tmp_path / "front.png")
    assert sorted(label for label, _ in boxes) == sorted(s for s, *_ in plans if s)
    for i, (la, a) in enumerate(boxes):
        for lb, b in boxes[i + 1:]:
            assert not _overlap(a, b), (la, a, lb, b)
    html = tmp_path / "front.html"
    front.plot_html(study, recs, int(2.5 * 2**20), html)
    assert "full every candidate (over budget: not trained)" in html.read_text()


PW = "s3cret-pw"


def test_a_tracking_server_that_refuses_is_one_line(monkeypatch):
    """Before the run (a TCP connect to the server's port) and during it (MLflow's client error,
    the server gone): one ConfigError line, the URL's password masked."""
    from mlflow.tracking import MlflowClient

    from autorank.errors import ConfigError
    from autorank.tracking.mlflow_tracker import check_tracking, tracking_error

    uri = f"http://autorank:{PW}@127.0.0.1:9"
    with pytest.raises(ConfigError) as e:
        check_tracking(uri, timeout_s=2)
    msg = str(e.value)
    assert "\n" not in msg and PW not in msg and msg.startswith(
        "tracking.uri: cannot connect to the MLflow server at http://autorank:***@127.0.0.1:9 (")
    check_tracking(f"sqlite:///{PW}/mlflow.db")  # a file store: no server to ask
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(Exception) as raised:
        MlflowClient(tracking_uri=uri).get_experiment_by_name("autorank")
    err = tracking_error(raised.value, uri)
    assert isinstance(err, ConfigError) and "\n" not in str(err) and PW not in str(err)
    assert tracking_error(raised.value, f"sqlite:///{PW}.db") is None  # not a server's error
    assert tracking_error(ValueError("a bug"), uri) is None


@pytest.mark.parametrize("override, starts", [
    (f"tracking.uri=http://autorank:{PW}@127.0.0.1:9", "autorank: error: tracking.uri: cannot connect to the "
                                                       "MLflow server at http://autorank:***@127.0.0.1:9"),
    (f"search.storage=postgresql://autorank:{PW}@127.0.0.1:1/autorank",
     "autorank: error: search.storage: cannot connect to postgresql://autorank:***@127.0.0.1:1/autorank"),
])
def test_the_app_ends_on_a_refused_server_with_one_line_and_status_2(tmp_path, override, starts):
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", override], cwd=tmp_path,
                       env={**os.environ, "AUTORANK_ROOT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), p.stderr
    assert PW not in p.stdout + p.stderr


def _lost_study_run(c, exp_id: str, name: str, beat_t: float | None, every_s: float = 1.0) -> str:
    """A RUNNING study run as a worker leaves it: its heartbeat last written at beat_t (None: no
    heartbeat tag, as a run without heartbeats has)."""
    tags = {"autorank.kind": "study", "study_name": name}
    if beat_t is not None:
        tags["autorank.heartbeat.otherhost.4242"] = json.dumps({"worker": "otherhost pid 4242", "t": beat_t,
                                                                "every_s": every_s})
    return c.create_run(exp_id, run_name=f"study {name}", tags=tags).info.run_id


def test_a_dead_workers_study_run_is_ended_killed_at_the_next_start(tmp_path):
    """Runs whose workers all missed 3 heartbeats are ended KILLED by the next start, whichever
    study it starts; a live worker's run and a run without heartbeats are left RUNNING."""
    import os
    import re
    import socket
    import time

    from autorank.tracking.heartbeat import LOST_TAG

    uri = f"sqlite:///{tmp_path}/m.db"
    c = MlflowClient(uri)
    tracker = MlflowTracker(uri, experiment="e")
    exp = tracker.connect()
    now = time.time()
    dead = _lost_study_run(c, exp, "dead", now - 3.5)  # 3 heartbeats of 1 s missed
    late = _lost_study_run(c, exp, "late", now - 2.5, every_s=1.0)  # not yet 3: alive
    slow = _lost_study_run(c, exp, "slow", now - 20.0, every_s=10.0)  # its own beat is 10 s
    old = _lost_study_run(c, exp, "old", None)
    tracker.start_study({"study_name": "s", "heartbeat_s": 0.2, "budget_bytes": 1})
    status = {rid: c.get_run(rid).info.status for rid in (dead, late, slow, old)}
    assert status == {dead: "KILLED", late: "RUNNING", slow: "RUNNING", old: "RUNNING"}
    run = c.get_run(dead)
    # ended when its worker stopped beating (ms; the tag's float may round either way)
    assert abs(run.info.end_time - (now - 3.5) * 1000) <= 1
    assert not [k for k in run.data.tags if k.startswith("autorank.heartbeat.")]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now - 3.5))
    m = re.fullmatch(
        f"worker otherhost pid 4242 stopped without ending this run: no heartbeat since {when} "
        r"\((\d+) s, 3 heartbeats of 1 s missed: SIGKILL, out of memory or power loss\); ended KILLED at the "
        f"start of worker {re.escape(socket.gethostname())} pid {os.getpid()}", run.data.tags[LOST_TAG])
    assert m and 3 <= int(m[1]) <= time.time() - (now - 3.5) + 1, run.data.tags[LOST_TAG]
    # this worker beats every 0.2 s on its own run, and takes its tag away when it ends the run
    (key,) = [k for k in c.get_run(tracker.parent_run_id).data.tags if k.startswith("autorank.heartbeat.")]
    t0 = json.loads(c.get_run(tracker.parent_run_id).data.tags[key])["t"]
    time.sleep(0.7)
    t1 = json.loads(c.get_run(tracker.parent_run_id).data.tags[key])["t"]
    assert t1 - t0 >= 0.4
    tracker.abort_study([])
    mine = c.get_run(tracker.parent_run_id)
    assert mine.info.status == "KILLED" and key not in mine.data.tags and LOST_TAG not in mine.data.tags
    # the dead run's own study started again: resumed RUNNING, the tag kept as its history
    again = MlflowTracker(uri, experiment="e")
    assert again.start_study({"study_name": "dead", "heartbeat_s": 0.2}) == dead
    run = c.get_run(dead)
    assert run.info.status == "RUNNING" and LOST_TAG in run.data.tags
    again.abort_study([])
