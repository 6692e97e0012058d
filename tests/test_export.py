"""Export from a study's storage: by memory cap, FLOPs cap, trial; clear error when none fits."""

import subprocess
import sys

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


def test_cli_subprocess(study, tmp_path):
    storage, _ = study
    out = tmp_path / "cli.yaml"
    r = subprocess.run([sys.executable, "-m", "autorank.export", "--storage", storage, "--study", "s",
                        "--max-mb", "1000", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    best = max(pareto_front(records_from_storage(storage, "s")),
               key=lambda r: (r.val_accuracy, -r.predicted_peak_bytes, -r.flops))
    assert Plan.load(out).meta["exported_from"]["trial"] == best.number
