"""MLflow: parent run per study, nested run per trial, front artifacts (tmp sqlite store)."""

import json

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
