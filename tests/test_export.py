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


def test_finetune_on_device_script_is_torch_only(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from autorank.cost import measure_saved_bytes
    from autorank.plan import Choice, Plan, apply_plan
    from autorank.workload.models import small_cnn

    model = small_cnn(num_classes=4, in_channels=3, width=4)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    plan = Plan(layers={names[-1]: Choice.full(), names[-2]: Choice.full()},
                meta={"model": {"factory": "autorank.workload.models:small_cnn",
                                "kwargs": {"num_classes": 4, "in_channels": 3, "width": 4}},
                      "input_shape": [8, 3, 12, 12]})
    x, y = torch.randn(24, 3, 12, 12), torch.randint(0, 4, (24,))
    m = apply_plan(small_cnn(num_classes=4, in_channels=3, width=4).eval(), plan)
    plan.meta["predicted_activation_bytes"] = measure_saved_bytes(
        lambda: torch.nn.functional.cross_entropy(m(x[:8]), y[:8]), m).activation_bytes
    plan.save(tmp_path / "plan.yaml")
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    script = Path(__file__).resolve().parents[1] / "scripts" / "finetune_on_device.py"
    code = (f"import runpy, sys; sys.argv = ['x', {str(tmp_path / 'plan.yaml')!r}, "
            f"{str(tmp_path / 'ckpt.pt')!r}, {str(tmp_path / 'data.pt')!r}]\n"
            f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('STACK', sorted(m for m in ('hydra', 'optuna', 'lightning', 'mlflow', "
            "'pytorch_lightning') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "STACK []" in r.stdout
    assert "(+0.00%)" in r.stdout and "epoch 1/1: train loss" in r.stdout
