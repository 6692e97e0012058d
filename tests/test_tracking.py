"""MLflow: parent run per study, nested run per trial, front artifacts (tmp sqlite store)."""

import json

import pytest

from mlflow.tracking import MlflowClient

from autorank.search.study import run_study
from autorank.tracking import MlflowTracker
from test_search_study import DEVICE, LAYERS, FakeWorkload, study_kwargs


def test_study_logged_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracker = MlflowTracker(uri, experiment="t", artifact_location=str(tmp_path / "mlruns" / "art"))
    wl = FakeWorkload(fail_on={"l0": "frozen", "l1": "frozen", "l2": "full"})
    space, kw = study_kwargs(tmp_path, export_path=tmp_path / "plan.yaml")
    cfg = {"seed": 0, "model": {"_target_": "x.y", "width": 8}}
    res = run_study(wl, DEVICE, space, n_trials=12, tracker=tracker, config=cfg, **kw)

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("t")
    parent = c.get_run(tracker.parent_run_id)
    p = parent.data.params
    assert p["study_name"] == "s" and p["storage"] == kw["storage"]
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
    assert sorted(row["trial"] for row in table) == sorted(r.number for r in res.front)
    assert all(row["state"] == "complete" and row["on_front"] for row in table)
    assert str(tmp_path / "mlruns" / "art") in parent.info.artifact_uri


def test_front_files_are_written_atomically(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from autorank.tracking import front

    recs = [SimpleNamespace(number=i, state=s, on_front=i == 0, val_accuracy=0.5 + i / 10,
                            peak_mb=(1 + i), predicted_peak_bytes=(1 + i) * 2**20,
                            predicted_activation_bytes=10, measured_activation_bytes=10,
                            flops=1e9 * (i + 1), step_time_s=1.0, wall_s=0.1, source="t",
                            choices={"l0": "full", "l1": "frozen"})
            for i, s in enumerate(["complete", "complete", "infeasible"])]
    csv_p, json_p, png, html = (tmp_path / n for n in ("front.csv", "front.json", "front.png", "front.html"))
    front.write_table(recs, csv_p, json_p)
    front.plot_png(recs, 3 * 2**20, png)
    front.plot_html(recs, 3 * 2**20, html)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json_p.read_text())[0]["choices"] == "l0=full"
    assert csv_p.read_text().splitlines()[0].startswith("trial,state,on_front")
    assert "plotly" in html.read_text()
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
        front.plot_png(recs[:1], 2**20, png)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


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
