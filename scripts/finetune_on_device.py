#!/usr/bin/env python
"""Fine-tune with an exported plan on the device, with torch alone.

    python scripts/finetune_on_device.py PLAN CHECKPOINT DATA [--epochs 1] [--lr 0.05] [--batch-size B]

PLAN        a plan file from `python -m autorank` / `python -m autorank.export` (YAML or JSON)
CHECKPOINT  the base model's state dict (torch.save(model.state_dict())), e.g. the cached
            checkpoint the study used (its path is in the MLflow parent run's config); weights
            whose shape differs from the model built here (an upstream head) are skipped and that
            layer keeps its fresh initialisation
DATA        a .pt file holding the training tensors: a dict {"x": float (N, C, H, W), "y": long (N,)}
            or a tuple (x, y), made with torch.save; optional "x_val"/"y_val" for an accuracy

The model comes from the plan's meta.model ({"factory": "module:function", "kwargs": {...}},
written by the study; the factories of autorank.workload.models import only torch/torchvision) or
from --model module:function --model-kwargs JSON. Imports no Hydra, Optuna, Lightning or MLflow.
Prints the measured saved-activation bytes of one training step against the plan's prediction.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from autorank.cost import measure_saved_bytes  # noqa: E402  (torch only)
from autorank.plan import Plan, apply_plan  # noqa: E402  (torch + yaml only)


def build_model(plan: Plan, factory: str | None, kwargs: dict | None) -> torch.nn.Module:
    spec = dict(plan.meta.get("model") or {})
    factory = factory or spec.get("factory")
    if not factory:
        raise SystemExit("the plan's meta has no model factory: pass --model module:function")
    kwargs = kwargs if kwargs is not None else dict(spec.get("kwargs") or {})
    if ":" in factory:
        module, fn = factory.split(":", 1)
    else:
        module, _, fn = factory.rpartition(".")
    return getattr(_import(module), fn)(**kwargs)


def _import(module: str):
    """Import `module`; an autorank submodule is loaded from its file alone, so that a package
    __init__ that imports the search stack (autorank.workload imports Lightning) is not run."""
    if module.startswith("autorank."):
        import importlib.util

        import autorank

        path = Path(autorank.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(f"_device_{module.replace('.', '_')}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses need the module registered
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def load_weights(model: torch.nn.Module, checkpoint: str) -> list[str]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return sorted(set(own) - set(keep))


def load_data(path: str):
    d = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(d, dict):
        return d["x"].float(), d["y"].long(), d.get("x_val"), d.get("y_val")
    x, y = d[0], d[1]
    return x.float(), y.long(), None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("plan")
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the plan's input_shape[0]")
    ap.add_argument("--model", default=None, help="module:function (default: the plan's meta.model)")
    ap.add_argument("--model-kwargs", default=None, help="JSON kwargs for --model")
    ap.add_argument("--out", default=None, help="save the fine-tuned state dict here")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    plan = Plan.load(a.plan)
    model = build_model(plan, a.model, json.loads(a.model_kwargs) if a.model_kwargs else None)
    skipped = load_weights(model, a.checkpoint)
    if skipped:
        print(f"fresh (not in checkpoint or other shape): {', '.join(skipped)}")
    model = apply_plan(model, plan)
    model.eval()  # BN in eval mode, as in the search (frozen statistics)
    x, y, xv, yv = load_data(a.data)
    shape = plan.meta.get("input_shape")
    bs = a.batch_size or (shape[0] if shape else 32)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SystemExit("the plan trains no parameter")
    opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum)

    # one step's saved activations, at the batch size the plan was costed for
    xb, yb = x[:bs], y[:bs]
    saved = measure_saved_bytes(lambda: F.cross_entropy(model(xb), yb), model)
    predicted = plan.meta.get("predicted_activation_bytes")
    line = f"saved activations per step (batch {len(xb)}): measured {saved.activation_bytes:,} bytes"
    if predicted:
        diff = 100 * (saved.activation_bytes - predicted) / predicted
        line += f", plan predicted {int(predicted):,} bytes ({diff:+.2f}%)"
        if shape and len(xb) != shape[0]:
            line += f" [plan costed batch {shape[0]}]"
    print(line)

    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        perm = torch.randperm(len(x))
        total, n = 0.0, 0
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise SystemExit(f"loss is {loss.item()} at epoch {epoch}, step {i // bs}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss) * len(idx), n + len(idx)
        print(f"epoch {epoch + 1}/{a.epochs}: train loss {total / n:.4f}")
    print(f"training took {time.perf_counter() - t0:.1f} s")
    if xv is not None:
        with torch.no_grad():
            acc = float((model(xv.float()).argmax(1) == yv.long()).float().mean())
        print(f"validation accuracy {acc:.4f}")
    if a.out:
        torch.save(model.state_dict(), a.out)
        print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
