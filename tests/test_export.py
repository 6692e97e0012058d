"""Export from a study's storage: by memory cap, FLOPs cap, trial; clear error when none fits."""

import pytest

from autorank.export import NoPlanFound, export, main, select
from autorank.plan import Plan
from autorank.search.study import pareto_front, records_from_storage, run_study
from test_search_study import DEVICE, FakeWorkload, study_kwargs


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    space, kw = study_kwargs(tmp)
    run_study(FakeWorkload(), DEVICE, space, n_trials=16, **kw)
    return kw["storage"], tmp


def test_export_by_memory_cap(study, tmp_path):
    storage, _ = study
    front = pareto_front(records_from_storage(storage, "s"))
    assert len(front) >= 2
    peaks = sorted({r.predicted_peak_bytes for r in front})
    cap_mb = peaks[len(peaks) // 2] / 2**20  # a cap that excludes the biggest front points
    rec, path = export(storage, "s", tmp_path / "p.yaml", max_mb=cap_mb)
    assert rec.on_front or rec.number in {r.number for r in front}
    assert rec.predicted_peak_bytes <= cap_mb * 2**20
    under = [r for r in front if r.predicted_peak_bytes <= cap_mb * 2**20]
    assert rec.val_accuracy == max(r.val_accuracy for r in under)
    plan = Plan.load(path)
    assert plan.meta["choices"] == rec.choices and plan.meta["exported_from"]["trial"] == rec.number


def test_export_clear_error_when_nothing_fits(study, tmp_path):
    storage, _ = study
    lo = min(r.peak_mb for r in pareto_front(records_from_storage(storage, "s")))
    with pytest.raises(NoPlanFound, match=f"smallest peak is {lo:.2f} MB"):
        export(storage, "s", tmp_path / "p.yaml", max_mb=lo * 0.5)
    assert main(["--storage", storage, "--study", "s", "--max-mb", str(lo * 0.5),
                 "--out", str(tmp_path / "x.yaml")]) == 1
    assert not (tmp_path / "x.yaml").exists()


def test_export_by_flops_and_trial(study, tmp_path):
    storage, _ = study
    recs = records_from_storage(storage, "s")
    front = pareto_front(recs)
    cap = min(r.flops for r in front)
    rec = select(recs, max_flops=cap)
    assert rec.flops == cap
    infeasible = next(r for r in recs if r.state == "infeasible")
    with pytest.raises(NoPlanFound, match="infeasible"):
        select(recs, trial=infeasible.number)
    assert select(recs, trial=front[0].number).number == front[0].number


def test_cli(study, tmp_path, capsys):
    storage, _ = study
    out = tmp_path / "cli.yaml"
    assert main(["--storage", storage, "--study", "s", "--max-mb", "1000", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    best = max(pareto_front(records_from_storage(storage, "s")),
               key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes, -r.flops))
    assert Plan.load(out).meta["exported_from"]["trial"] == best.number


def test_export_reads_storage_once_and_refuses_bad_storage(study, tmp_path, capsys, monkeypatch):
    storage, _ = study
    import autorank.export as ex

    calls = []
    real = ex.records_from_storage
    monkeypatch.setattr(ex, "records_from_storage", lambda *a: calls.append(a) or real(*a))
    assert main(["--storage", storage, "--study", "s", "--max-mb", "1000", "--out", str(tmp_path / "a.yaml")]) == 0
    assert calls == [(storage, "s")]
    capsys.readouterr()

    missing = tmp_path / "nope" / "optuna.db"
    assert main(["--storage", f"sqlite:///{missing}", "--study", "s", "--out", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no sqlite database at") and str(missing) in err
    assert not missing.exists() and not missing.parent.exists()  # sqlite did not create an empty db
    assert not (tmp_path / "b.yaml").exists()

    for url, msg in [("notaurl", "cannot read the study from storage 'notaurl'"),
                     ("sqlite://", "names no database file"),
                     (storage, "study 'other' not found")]:
        assert main(["--storage", url, "--study", "other" if url == storage else "s"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err
    assert "studies there: 's'" in err


def test_export_stamps_fingerprint_of_the_meta_model(study, tmp_path):
    from autorank.plan import Choice, Plan, apply_plan, candidate_layers, model_fingerprint
    from autorank.search.study import TrialRecord
    from autorank.models import small_cnn

    kwargs = {"num_classes": 4, "in_channels": 3, "width": 4}
    model = small_cnn(**kwargs)
    last = candidate_layers(model)[-1]
    meta = {"model": {"factory": "autorank.workload.models:small_cnn", "kwargs": kwargs}}
    other = model_fingerprint(small_cnn(num_classes=4, in_channels=3, width=8))
    rec = TrialRecord(number=3, state="complete", val_accuracy=0.5, predicted_peak_bytes=1, flops=1,
                      plan=Plan({last: Choice.full()}, meta=meta, fingerprint=other).to_dict())
    _, path = export("sqlite:///unused.db", "s", tmp_path / "p.yaml", trial=3, records=[rec])
    plan = Plan.load(path)
    assert plan.fingerprint == model_fingerprint(model) != other  # built from meta.model wins
    apply_plan(small_cnn(**kwargs), plan)  # strict: fits
    with pytest.raises(ValueError, match="first mismatched layer"):
        apply_plan(small_cnn(num_classes=4, in_channels=3, width=8), plan)

    # no buildable factory (not autorank's, so never imported): the plan's own fingerprint stays
    rec.plan = Plan({last: Choice.full()}, meta={"model": {"factory": "os:system", "kwargs": {}}},
                    fingerprint=other).to_dict()
    _, path = export("sqlite:///unused.db", "s", tmp_path / "q.yaml", trial=3, records=[rec])
    assert Plan.load(path).fingerprint == other
