"""Export from a study's storage: by memory cap, FLOPs cap, trial; clear error when none fits."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autorank.export import NoPlanFound, export, main, select
from autorank.plan import Plan
from autorank.search.records import records_from_storage
from autorank.search.study import run_study
from search_fakes import DEVICE, FakeWorkload, study_args


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    space, st, kw = study_args(tmp, n_trials=16)
    run_study(FakeWorkload(), DEVICE, space, st, **kw)
    return st.storage, tmp


def front(storage):
    return [r for r in records_from_storage(storage, "s") if r.on_front]


def test_the_export_front_is_optunas(study):
    storage, _ = study
    best = {t.number for t in optuna.load_study(study_name="s", storage=storage).best_trials}
    assert best and {r.number for r in front(storage)} == best
    # non-dominated, and every feasible trial off the front is dominated by a front point
    recs = records_from_storage(storage, "s")

    def dom(a, b):
        return all(x >= y for x, y in zip((a[0], -a[1], -a[2]), (b[0], -b[1], -b[2]))) and a != b

    on = [r for r in recs if r.on_front]
    for r in recs:
        if r.state == "complete":
            dominated = any(dom(o.objectives, r.objectives) for o in on)
            assert dominated != r.on_front, r.number


def test_export_by_memory_cap(study, tmp_path):
    storage, _ = study
    fr = front(storage)
    assert len(fr) >= 2
    peaks = sorted({r.predicted_peak_bytes for r in fr})
    cap_mb = peaks[len(peaks) // 2] / 2**20  # a cap that excludes the biggest front points
    rec, path = export(storage, "s", tmp_path / "p.yaml", max_mb=cap_mb)
    assert rec.on_front and rec.predicted_peak_bytes <= cap_mb * 2**20
    under = [r for r in fr if r.predicted_peak_bytes <= cap_mb * 2**20]
    assert rec.val_accuracy == max(r.val_accuracy for r in under)
    plan = Plan.load(path)
    assert plan.meta["choices"] == rec.choices and plan.meta["exported_from"]["trial"] == rec.number
    assert plan.meta["val_accuracy"] == rec.val_accuracy


def test_export_clear_error_when_nothing_fits(study, tmp_path, capsys):
    storage, _ = study
    lo = min(r.peak_mb for r in front(storage))
    with pytest.raises(NoPlanFound, match=f"smallest peak is {lo:.2f} MB"):
        export(storage, "s", tmp_path / "p.yaml", max_mb=lo * 0.5)
    capsys.readouterr()
    assert main(["--storage", storage, "--study", "s", "--max-mb", str(lo * 0.5),
                 "--out", str(tmp_path / "x.yaml")]) == 1  # the documented status: no plan fits
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"error: no plan fits: no front point satisfies peak <= {lo * 0.5} MB: the front's smallest peak is "
        f"{lo:.2f} MB and its fewest FLOPs {min(r.flops for r in front(storage)):g} per step "
        f"({len(front(storage))} front points)\n")
    assert not (tmp_path / "x.yaml").exists()
    import autorank.export

    assert "1  no plan fits" in autorank.export.__doc__


def test_export_by_flops_and_trial(study, tmp_path):
    storage, _ = study
    recs = records_from_storage(storage, "s")
    fr = [r for r in recs if r.on_front]
    cap = min(r.flops for r in fr)
    rec = select(recs, max_flops=cap)
    assert rec.flops == cap
    infeasible = next(r for r in recs if r.state == "infeasible")
    with pytest.raises(NoPlanFound, match="infeasible"):
        select(recs, trial=infeasible.number)
    assert select(recs, trial=fr[0].number).number == fr[0].number


def test_cli(study, tmp_path, capsys):
    storage, _ = study
    out = tmp_path / "cli.yaml"
    assert main(["--storage", storage, "--study", "s", "--max-mb", "1000", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    best = max(front(storage), key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes, -r.flops))
    assert Plan.load(out).meta["exported_from"]["trial"] == best.number
    assert main(["--storage", storage, "--study", "s", "--list"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("trial")]
    assert sorted(int(n) for n in listed) == sorted(r.number for r in front(storage))


def test_export_refuses_bad_storage(study, tmp_path, capsys):
    storage, _ = study
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


@pytest.mark.parametrize("fmt", ["finetune", "old meta.model"])
def test_export_stamps_fingerprint_of_the_settings_model(tmp_path, fmt):
    from autorank.plan import Choice, apply_plan, candidate_layers, model_fingerprint
    from autorank.plan.plan import FineTuneSettings
    from autorank.search.records import TrialRecord
    from autorank.models import small_cnn

    kwargs = {"num_classes": 4, "in_channels": 3, "width": 4}
    factory = "autorank.models:small_cnn"
    model = small_cnn(**kwargs)
    last = candidate_layers(model)[-1]
    meta = ({"finetune": FineTuneSettings(model_factory=factory, model_kwargs=kwargs).to_dict()}
            if fmt == "finetune" else {"model": {"factory": factory, "kwargs": kwargs}})
    other = model_fingerprint(small_cnn(num_classes=4, in_channels=3, width=8))
    rec = TrialRecord(number=3, state="complete", val_accuracy=0.5, predicted_peak_bytes=1, flops=1,
                      plan=Plan({last: Choice.full()}, meta=meta, fingerprint=other).to_dict())
    _, path = export("sqlite:///unused.db", "s", tmp_path / "p.yaml", trial=3, records=[rec])
    plan = Plan.load(path)
    assert plan.fingerprint == model_fingerprint(model) != other  # built from the settings wins
    apply_plan(small_cnn(**kwargs), plan)  # strict: fits
    with pytest.raises(ValueError, match="first mismatched layer"):
        apply_plan(small_cnn(num_classes=4, in_channels=3, width=8), plan)

    # no buildable factory (not autorank's, so never imported): the plan's own fingerprint stays
    rec.plan = Plan({last: Choice.full()}, meta={"finetune": {"model_factory": "os:system"}},
                    fingerprint=other).to_dict()
    _, path = export("sqlite:///unused.db", "s", tmp_path / "q.yaml", trial=3, records=[rec])
    assert Plan.load(path).fingerprint == other


def test_select_prefers_refit_accuracy():
    """A study with refits exports the best refit plan (within the caps), even one off the proxy
    front; without refits it falls back to the best proxy accuracy on the front."""
    from autorank.export import select
    from autorank.search.records import TrialRecord

    def rec(n, acc, peak, refit=None, on_front=True):
        return TrialRecord(number=n, state="complete", val_accuracy=acc, predicted_peak_bytes=peak,
                           flops=1, plan={}, on_front=on_front, refit_accuracy=refit)

    rs = [rec(0, 0.9, 300, refit=0.80), rec(1, 0.7, 100, refit=0.85, on_front=False), rec(2, 0.5, 50)]
    assert select(rs).number == 1
    assert select(rs, max_mb=200 / 2**20).number == 1
    assert select(rs, max_mb=60 / 2**20).number == 2  # no refit within the cap: the proxy front
    for r in rs:
        r.refit_accuracy = None
    assert select(rs).number == 0


def test_cli_writes_the_studys_plan_file(tmp_path, capsys):
    """A study whose trials train 50 steps and whose best plans are refit at 100: the CLI's plan
    file for the exported trial is the study's own (same layers, fine-tuning settings with the
    refit's 100 steps, same accuracy fields), and --list prints the refit accuracy beside the
    trial's."""
    wl = FakeWorkload(refit_bonus={"full": 0.05, "asi@0.9": 0.04}, refit_steps=100)
    space, st, kw = study_args(tmp_path, n_trials=10, trial_steps=50, refit_steps=100, refit_top=2,
                               references=False, export_path=tmp_path / "study.yaml")
    res = run_study(wl, DEVICE, space, st, **kw)
    best = res.best
    assert best is not None and best.refit_accuracy is not None and best.refit_steps == 100
    ours = Plan.load(tmp_path / "study.yaml")
    # the refit's accuracy is the fake's formula at 100 steps: the trial's plus the bonus of l0's choice
    assert best.refit_accuracy == pytest.approx(best.val_accuracy + wl.refit_bonus.get(best.choices["l0"], 0.0))
    assert ours.meta["finetune"]["max_steps"] == 100 and ours.meta["finetune"]["epochs"] is None
    assert ours.meta["accuracy"] == best.refit_accuracy and ours.meta["accuracy_from"] == "refit"
    assert ours.meta["val_accuracy"] == best.val_accuracy and ours.meta["refit_accuracy"] == best.refit_accuracy
    assert ours.meta["process_peak_bytes"] == DEVICE.process_peak(best.predicted_peak_bytes).total_bytes

    out = tmp_path / "cli.yaml"
    assert main(["--storage", st.storage, "--study", "s", "--max-mb", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cli = Plan.load(out)
    assert cli.meta.pop("exported_from")["trial"] == best.number
    assert cli.layers == ours.layers
    assert cli.meta == ours.meta  # settings (max_steps 100), accuracies, peaks: all the same
    assert f"refit {best.refit_accuracy:.4f} (100 steps)" in printed

    # a front trial that was not refit: the trial's own 50 steps and accuracy, saying so
    plain = next(r for r in res.front if r.refit_accuracy is None)
    assert main(["--storage", st.storage, "--study", "s", "--trial", str(plain.number), "--out", str(out)]) == 0
    cli = Plan.load(out)
    assert cli.meta["finetune"]["max_steps"] == 50 and cli.meta["accuracy_from"] == "trial"
    assert cli.meta["accuracy"] == plain.val_accuracy and "refit_accuracy" not in cli.meta
    cli.meta.pop("exported_from")
    assert cli.meta == Plan.load(res.plan_files[plain.number]).meta

    capsys.readouterr()
    assert main(["--storage", st.storage, "--study", "s", "--list"]) == 0
    listed = {int(line.split()[1]): line for line in capsys.readouterr().out.splitlines()}
    assert f"accuracy {best.val_accuracy:.4f} (trial, 50 steps), refit {best.refit_accuracy:.4f}" in listed[best.number]
    assert "refit" not in listed[plain.number]
