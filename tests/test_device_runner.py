"""The device runner (`autorank-device` / `python -m autorank.device`): torch only, its measured
saved bytes equal the prediction, its output weights load into the plain model, bad input is one
line and exit status 2."""

import copy
import subprocess
import sys

import pytest
import torch

import autorank.device.runner as runner
from blocking import import_blocker
from autorank.cost import predict_saved_bytes
from autorank.device import main
from autorank.device.data import TensorSplit
from autorank.models import mcunet_like, replace_head
from autorank.plan import Choice, Plan, applied_plan, build_model_from_factory, finetune_mode, load_base_weights

KW = {"num_classes": 4, "width_mult": 0.25}
ASI_LAYER = "features.14.conv.2"
STACK = ("hydra", "optuna", "lightning", "pytorch_lightning", "mlflow", "torchvision", "optuna_integration")

# Runs `python -m autorank.device ARGS` in a process where the search stack cannot be imported.
BLOCKED_RUN = import_blocker(STACK) + r"""
import os, runpy
os.environ["AUTORANK_DEVICE_CHILD"] = "1"  # the runner in this process, where the stack is blocked
sys.argv = ["autorank-device", *sys.argv[2:]]
try:
    runpy.run_module("autorank.device", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
print("STACK", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED))
"""


def _device_files(tmp_path, factory="autorank.models:mcunet_like"):
    """mcunet_like (dropout before its classifier), an upstream checkpoint with a 10-class head,
    a plan with an ASI layer and a trained classifier, and data of 20 + 6 samples."""
    torch.manual_seed(1)
    torch.save(mcunet_like(num_classes=10, width_mult=0.25).state_dict(), tmp_path / "ckpt.pt")
    plan = Plan({ASI_LAYER: Choice.asi([4, 8, 2, 2]), "classifier.1": Choice.full()},
                meta={"model": {"factory": factory, "kwargs": KW}, "input_shape": [8, 3, 32, 32]})
    plan.save(tmp_path / "plan.yaml", model=mcunet_like(**KW))
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(20, 3, 32, 32, generator=g), "y": torch.randint(0, 4, (20,), generator=g),
            "x_val": torch.randn(6, 3, 32, 32, generator=g), "y_val": torch.randint(0, 4, (6,), generator=g)}
    torch.save(data, tmp_path / "data.pt")
    return plan, data


def test_runner_is_torch_only_and_measures_the_predicted_bytes(tmp_path):
    plan, data = _device_files(tmp_path)
    base = mcunet_like(**KW)
    assert load_base_weights(base, tmp_path / "ckpt.pt") == ["classifier.1.weight", "classifier.1.bias"]
    xb = data["x"][:8].clone()
    expected = predict_saved_bytes(finetune_mode(base), xb, plan).activation_bytes
    # the figure depends on the mode and on the ASI layer: a runner in eval mode (no dropout mask)
    # or ignoring the ASI choice would print another number
    assert expected != predict_saved_bytes(base.eval(), xb, plan).activation_bytes
    full = Plan({ASI_LAYER: Choice.full(), "classifier.1": Choice.full()})
    assert expected != predict_saved_bytes(finetune_mode(base), xb, full).activation_bytes

    out = tmp_path / "ft" / "weights.pt"
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(STACK), str(tmp_path / "plan.yaml"),
                        str(tmp_path / "ckpt.pt"), str(tmp_path / "data.pt"), "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "STACK []" in r.stdout  # none of the search stack (nor torchvision) was imported
    assert (f"saved activations per step (batch 8, measured on the first step): measured {expected:,} bytes, "
            f"predicted {expected:,} bytes (+0.00%)") in r.stdout
    assert "kept fresh on purpose: classifier.1.weight, classifier.1.bias" in r.stdout
    assert "SGD lr 0.01," in r.stdout and "epoch 1/1: train loss" in r.stdout
    assert "validation accuracy" in r.stdout and "warning" not in r.stderr
    state = torch.load(out, weights_only=True)
    assert not any("base_layer" in k for k in state)
    mcunet_like(**KW).load_state_dict(state, strict=True)  # the plain model's keys, all of them
    assert [p.name for p in out.parent.iterdir()] == ["weights.pt"]  # no temp file left


def test_runner_out_round_trip_with_an_old_plans_factory_name(tmp_path, monkeypatch, capsys):
    """A plan written before autorank.models existed names autorank.workload.models: it still runs."""
    plan, data = _device_files(tmp_path, factory="autorank.workload.models:mcunet_like")
    captured = {}
    real_save = runner.save_base_weights

    def save(model, path):
        captured["model"] = model
        return real_save(model, path)

    monkeypatch.setattr(runner, "save_base_weights", save)
    out = tmp_path / "w.pt"
    assert main([str(tmp_path / "plan.yaml"), str(tmp_path / "ckpt.pt"), str(tmp_path / "data.pt"),
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


def test_runner_fresh_head_equals_the_searchs_head(tmp_path):
    """The search fine-tunes a fresh, seeded head (autorank.models.replace_head); the runner
    re-initialises a checkpoint head of the right shape the same way, unless --keep-head."""
    _device_files(tmp_path)
    torch.manual_seed(5)
    ckpt_model = mcunet_like(**KW)  # the downstream head shape: loaded, then replaced
    torch.save(ckpt_model.state_dict(), tmp_path / "same_head.pt")
    args = [str(tmp_path / "plan.yaml"), str(tmp_path / "same_head.pt"), str(tmp_path / "data.pt"), "--epochs", "0"]
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "fresh.pt")]) == 0
    assert main([*args, "--keep-head", "--out", str(tmp_path / "kept.pt")]) == 0
    ref = replace_head(copy.deepcopy(ckpt_model), 4, seed=3).classifier[1]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    assert torch.equal(fresh["classifier.1.weight"], ref.weight) and torch.equal(fresh["classifier.1.bias"], ref.bias)
    assert torch.equal(kept["classifier.1.weight"], ckpt_model.classifier[1].weight)
    assert not torch.equal(ref.weight, ckpt_model.classifier[1].weight)


def test_factory_names_new_and_old_build_the_same_model():
    torch.manual_seed(0)
    a = build_model_from_factory("autorank.models:mcunet_like", KW)
    torch.manual_seed(0)
    b = build_model_from_factory("autorank.workload.models:mcunet_like", KW)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="has no function 'replace_head'"):  # only the factories
        build_model_from_factory("autorank.models:replace_head", {})


def _junk(p):
    p.write_bytes(b"not a torch file\n")
    return p


BAD_INPUTS = {
    "missing plan": (lambda t: [t / "nope.yaml", t / "ckpt.pt", t / "data.pt"], "plan file", "does not exist"),
    "invalid plan": (lambda t: [(t / "bad.yaml").write_text("layers: [") and t / "bad.yaml", t / "ckpt.pt",
                                t / "data.pt"], "bad.yaml is not valid YAML", "at line 1"),
    "fingerprint": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "data.pt", "--model",
                               "autorank.models:mcunet_like", "--model-kwargs",
                               '{"num_classes": 4, "width_mult": 0.5}'],
                    "first mismatched layer 'features.0.0'", "build the model the plan was made for"),
    "model kwargs not JSON": (lambda t: [t / "plan.yaml", t / "ckpt.pt", t / "data.pt", "--model-kwargs", "{"],
                              "--model-kwargs is not valid JSON", ""),
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
def test_runner_bad_input_exits_2_with_a_message(tmp_path, capsys, case):
    _, data = _device_files(tmp_path)
    torch.save(mcunet_like(num_classes=4, width_mult=0.5).state_dict(), tmp_path / "other.pt")
    torch.save({"x": data["x"], "z": data["y"]}, tmp_path / "noy.pt")
    torch.save({"x": data["x"], "y": data["y"], "x_val": data["x_val"]}, tmp_path / "noyval.pt")
    torch.save({"x": data["x"], "y": torch.arange(20) % 10}, tmp_path / "y9.pt")
    argv, msg, hint = BAD_INPUTS[case]
    capsys.readouterr()
    assert main([str(a) for a in argv(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and hint in err, err
    assert "Traceback" not in err


def test_runner_bad_input_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "autorank.device", str(tmp_path / "nope.yaml"), "c.pt", "d.pt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: plan file {tmp_path / 'nope.yaml'} does not exist")
    assert "Traceback" not in r.stderr


def test_runner_steps_have_the_plans_batch_shape():
    """10 samples at batch 4: two full steps an epoch (the short last batch dropped, as in the
    search's trials); fewer samples than a batch: one step with all of them."""
    seen: list[int] = []

    class Recorder(torch.nn.Linear):
        def forward(self, x):
            seen.append(len(x))
            return super().forward(x)

    model = Recorder(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    split = TensorSplit(torch.randn(10, 3), torch.randint(0, 2, (10,)), None, mapped=False)
    assert runner.train(model, split, opt, bs=4, epochs=2)
    assert seen == [4, 4, 4, 4]
    seen.clear()
    assert runner.train(model, TensorSplit(torch.randn(3, 3), torch.randint(0, 2, (3,)), None, False), opt, bs=4, epochs=1)
    assert seen == [3]


def test_the_jobs_device_check_runs_two_steps_and_compares_the_peak(tmp_path, capfd):
    """The app's closing check: the runner in a fresh process, 2 steps, its measured process peak
    within 10% of its prediction for a small plan (a warning otherwise)."""
    from autorank.app import _device_check

    _device_files(tmp_path)
    _device_check(tmp_path / "plan.yaml", tmp_path / "ckpt.pt", str(tmp_path / "data.pt"))
    out, err = capfd.readouterr()
    line = next(s for s in out.splitlines() if s.startswith("device check"))
    measured = float(line.split("RSS ")[1].split(" MB")[0])
    predicted = float(line.split("predicted ")[1].split(" MB")[0])
    assert abs(measured - predicted) <= 0.1 * predicted and "warning" not in err, (line, err)
