"""The torch-only core imports with the search stack absent (what a device installs)."""

import subprocess
import sys

from blocking import import_blocker

BLOCKER = import_blocker({"hydra", "optuna", "lightning", "pytorch_lightning", "mlflow", "torchvision",
                          "optuna_integration", "transformers", "peft"}) + r"""
import autorank.shortcut, autorank.plan, autorank.cost, autorank.io, autorank.errors, autorank.units
# the rest of the torch-only core: the model factories a plan file names, and the device runner
import autorank.models, autorank.device, autorank.device.runner
# the method registry and every method in it
import autorank.methods
assert set(autorank.methods.kinds()) >= {"frozen", "full", "asi", "hosvd", "lora", "recompute"}
from autorank.plan import Plan, Choice, apply_plan
from autorank.cost import predict_saved_bytes, measure_saved_bytes, train_step_flops, predict_peak_training_bytes

# the blocker works: these really cannot be imported here
for name in ("hydra", "optuna", "lightning", "lightning.pytorch", "pytorch_lightning", "mlflow"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} imported despite the blocker")

# and the core works without them: apply a plan and predict its cost
import torch, torch.nn as nn
m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
x = torch.randn(2, 3, 8, 8)
plan = Plan({"4": Choice.asi([2, 8])})
p = predict_saved_bytes(m, x, plan)
apply_plan(m, plan)
assert p.activation_bytes == measure_saved_bytes(lambda: m(x), m).activation_bytes
heavy = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
assert not heavy, heavy
print("OK")
"""


def test_core_imports_without_search_stack():
    r = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
