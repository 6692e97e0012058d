"""Export from a study's storage: by memory cap, FLOPs cap, trial; clear error when none fits."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

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


def test_export_clear_error_when_nothing_fits(study, tmp_path):
    storage, _ = study
    lo = min(r.peak_mb for r in front(storage))
    with pytest.raises(NoPlanFound, match=f"smallest peak is {lo:.2f} MB"):
        export(storage, "s", tmp_path / "p.yaml", max_mb=lo * 0.5)
    assert main(["--storage", storage, "--study", "s", "--max-mb", str(lo * 0.5),
                 "--out", str(tmp_path / "x.yaml")]) == 1
    assert not (tmp_path / "x.yaml").exists()


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
    from autorank.workload.models import small_cnn

    kwargs = {"num_classes": 4, "in_channels": 3, "width": 4}
    factory = f"{small_cnn.__module__}:small_cnn"
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


# ---------------------------------------------------------------- scripts/finetune_on_device.py

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune_on_device.py"
KW = {"num_classes": 4, "width_mult": 0.25}
ASI_LAYER = "features.14.conv.2"


def _device_files(tmp_path):
    """mcunet_like (dropout before its classifier), an upstream checkpoint with a 10-class head,
    a plan with an ASI layer and a trained classifier, and data of 20 + 6 samples."""
    from autorank.plan import Choice, Plan
    from autorank.workload.models import mcunet_like

    torch.manual_seed(1)
    torch.save(mcunet_like(num_classes=10, width_mult=0.25).state_dict(), tmp_path / "ckpt.pt")
    plan = Plan({ASI_LAYER: Choice.asi([4, 8, 2, 2]), "classifier.1": Choice.full()},
                meta={"model": {"factory": "autorank.workload.models:mcunet_like", "kwargs": KW},
                      "input_shape": [8, 3, 32, 32]})
    plan.save(tmp_path / "plan.yaml", model=mcunet_like(**KW))
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(20, 3, 32, 32, generator=g), "y": torch.randint(0, 4, (20,), generator=g),
            "x_val": torch.randn(6, 3, 32, 32, generator=g), "y_val": torch.randint(0, 4, (6,), generator=g)}
    torch.save(data, tmp_path / "data.pt")
    return plan, data


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_on_device_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finetune_on_device_script_is_torch_only_and_matches_the_prediction(tmp_path):
    from autorank.cost import predict_saved_bytes
    from autorank.plan import Choice, Plan, finetune_mode, load_base_weights
    from autorank.workload.models import mcunet_like

    plan, data = _device_files(tmp_path)
    base = mcunet_like(**KW)
    assert load_base_weights(base, tmp_path / "ckpt.pt") == ["classifier.1.weight", "classifier.1.bias"]
    xb = data["x"][:8].clone()
    expected = predict_saved_bytes(finetune_mode(base), xb, plan).activation_bytes
    # the figure depends on the mode and on the ASI layer: a script in eval mode (no dropout mask)
    # or ignoring the ASI choice would print another number
    assert expected != predict_saved_bytes(base.eval(), xb, plan).activation_bytes
    full = Plan({ASI_LAYER: Choice.full(), "classifier.1": Choice.full()})
    assert expected != predict_saved_bytes(finetune_mode(base), xb, full).activation_bytes

    out = tmp_path / "ft" / "weights.pt"
    code = (f"import runpy, sys; sys.argv = ['x', {str(tmp_path / 'plan.yaml')!r}, "
            f"{str(tmp_path / 'ckpt.pt')!r}, {str(tmp_path / 'data.pt')!r}, '--out', {str(out)!r}]\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('STACK', sorted(m for m in ('hydra', 'optuna', 'lightning', 'mlflow', "
            "'pytorch_lightning') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "STACK []" in r.stdout
    assert (f"saved activations per step (batch 8): measured {expected:,} bytes, "
            f"predicted {expected:,} bytes (+0.00%)") in r.stdout
    assert "kept fresh on purpose: classifier.1.weight, classifier.1.bias" in r.stdout
    assert "SGD lr 0.01," in r.stdout and "epoch 1/1: train loss" in r.stdout
    assert "validation accuracy" in r.stdout and "warning" not in r.stderr
    state = torch.load(out, weights_only=True)
    assert not any("base_layer" in k for k in state)
    mcunet_like(**KW).load_state_dict(state, strict=True)  # the plain model's keys, all of them
    assert [p.name for p in out.parent.iterdir()] == ["weights.pt"]  # no temp file left


def test_finetune_on_device_out_round_trip(tmp_path, monkeypatch, capsys):
    from autorank.plan import applied_plan
    from autorank.workload.models import mcunet_like

    plan, data = _device_files(tmp_path)
    mod = _load_script()
    captured = {}
    real_save = mod.save_base_weights

    def save(model, path):
        captured["model"] = model
        return real_save(model, path)

    monkeypatch.setattr(mod, "save_base_weights", save)
    out = tmp_path / "w.pt"
    assert mod.main([str(tmp_path / "plan.yaml"), str(tmp_path / "ckpt.pt"), str(tmp_path / "data.pt"),
                     "--out", str(out), "--epochs", "2", "--lr", "0.05"]) == 0
    trained = captured["model"]
    assert applied_plan(trained) is not None  # the plan was put back after the save
    fresh = mcunet_like(**KW)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        a, b = trained(data["x_val"]), fresh(data["x_val"])
    assert torch.equal(a, b)
    # it trained the plan's layers and only them
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    saved = torch.load(out, weights_only=True)
    assert not torch.equal(saved[f"{ASI_LAYER}.weight"], ckpt[f"{ASI_LAYER}.weight"])
    assert torch.equal(saved["features.0.0.weight"], ckpt["features.0.0.weight"])
    assert "SGD lr 0.05," in capsys.readouterr().out


def _junk(p):
    p.write_bytes(b"not a torch file\n")
    return p


BAD_INPUTS = {
    "missing plan": (lambda t: [t / "nope.yaml", t / "ckpt.pt", t / "data.pt"], "plan file", "does not exist"),
    "invalid plan": (lambda t: [(t / "bad.yaml").write_text("layers: [") and t / "bad.yaml", t / "ckpt.pt",
                                t / "data.pt"], "is not a valid plan file", ""),
    "fingerprint": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "data.pt", "--model",
                               "autorank.workload.models:mcunet_like", "--model-kwargs",
                               '{"num_classes": 4, "width_mult": 0.5}'],
                    "first mismatched layer 'features.0.0'", "build the model the plan was made for"),
    "unreadable checkpoint": (lambda t: [t / "plan.yaml", _junk(t / "junk.pt"), t / "data.pt"],
                              "cannot read checkpoint", "torch.save(model.state_dict(), path)"),
    "checkpoint of another model": (lambda t: [t / "plan.yaml", t / "other.pt", t / "data.pt"],
                                    "does not fit the model: other shape: features.0.0.weight", ""),
    "unreadable data": (lambda t: [t / "plan.yaml", t / "ckpt.pt", _junk(t / "junk.pt")],
                        "cannot read data file", ""),
    "data without y": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "noy.pt"],
                       "holds a dict with keys ['x', 'z']", 'it needs "x"'),
    "x_val without y_val": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "noyval.pt"],
                            "has 'x_val' but no 'y_val'", ""),
    "labels beyond the head": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "y9.pt"],
                               "labels in [0, 9] but the model has 4 classes", "num_classes=10"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_finetune_on_device_bad_input_exits_2_with_a_message(tmp_path, capsys, case):
    from autorank.workload.models import mcunet_like

    _, data = _device_files(tmp_path)
    torch.save(mcunet_like(num_classes=4, width_mult=0.5).state_dict(), tmp_path / "other.pt")
    torch.save({"x": data["x"], "z": data["y"]}, tmp_path / "noy.pt")
    torch.save({"x": data["x"], "y": data["y"], "x_val": data["x_val"]}, tmp_path / "noyval.pt")
    torch.save({"x": data["x"], "y": torch.arange(20) % 10}, tmp_path / "y9.pt")
    argv, msg, hint = BAD_INPUTS[case]
    capsys.readouterr()
    assert _load_script().main([str(a) for a in argv(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and hint in err, err
    assert "Traceback" not in err


def test_finetune_on_device_bad_input_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.yaml"), "c.pt", "d.pt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: plan file {tmp_path / 'nope.yaml'} does not exist")
    assert "Traceback" not in r.stderr


def test_finetune_on_device_fresh_head_equals_the_searchs_head():
    """The search fine-tunes a fresh, seeded head (autorank.workload.models.replace_head); the
    device script re-initialises the checkpoint's head the same way (unless --keep-head)."""
    import copy

    from autorank.workload.models import mcunet_like, replace_head

    mod = _load_script()
    model = mcunet_like(**KW)
    ref = replace_head(copy.deepcopy(model), model.classifier[1].out_features, seed=3)
    before = torch.get_rng_state()
    assert mod.fresh_head(model, 3) == "classifier.1"
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(model.classifier[1].weight, ref.classifier[1].weight)
    assert torch.equal(model.classifier[1].bias, ref.classifier[1].bias)
