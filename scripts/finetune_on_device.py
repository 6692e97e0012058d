#!/usr/bin/env python
"""Fine-tune with an exported plan on the device, with torch alone.

    python scripts/finetune_on_device.py PLAN CHECKPOINT DATA [--epochs 1] [--lr 0.01] [--batch-size B] [--out W]

PLAN        a plan file from `python -m autorank` / `python -m autorank.export` (YAML or JSON)
CHECKPOINT  the base model's state dict (torch.save(model.state_dict())), e.g. the cached
            checkpoint the study used (its path is in the MLflow parent run's config). Every key
            must fit the model built here; only a classifier head of another shape (the upstream
            head of a pretraining checkpoint) is skipped, on purpose and reported: that layer keeps
            its fresh initialisation. Anything else that does not fit is an error.
DATA        a .pt file holding the training tensors: a dict {"x": float (N, C, H, W), "y": long (N,)}
            or a tuple (x, y), made with torch.save; optional "x_val"/"y_val" (both) for an accuracy

The model comes from the plan's meta.model ({"factory": "module:function", "kwargs": {...}},
written by the study; the factories of autorank.workload.models import only torch/torchvision) or
from --model module:function --model-kwargs JSON. Imports no Hydra, Optuna, Lightning or MLflow.

Trains in the fine-tuning mode the search costed (autorank.plan.finetune_mode: train mode, so
dropout is live; BatchNorm in eval mode) and prints the saved-activation bytes measured on one
forward of the model with the plan applied against predict_saved_bytes(base model, batch, plan)
(the workload's convention: model activations only, the loss's few bytes not included).
--out writes the fine-tuned base-model weights (plan removed: the plain model's keys) atomically.
Bad input (a missing or invalid file, a plan that does not fit the model) prints `error: ...` on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from autorank.cost import measure_saved_bytes, predict_saved_bytes  # noqa: E402  (torch only)
from autorank.plan import (  # noqa: E402  (torch + yaml only)
    Plan,
    apply_plan,
    build_model_from_factory,
    check_fingerprint,
    finetune_mode,
    load_base_weights,
    save_base_weights,
)

DEFAULT_LR = 0.01  # the workload's fine-tuning default (conf trainer.lr)


class BadInput(Exception):
    """Something the user passed is wrong; main prints `error: <message>` and exits 2."""


def build_model(plan: Plan, factory: str | None, kwargs: dict | None) -> torch.nn.Module:
    """--model/--model-kwargs (trusted: the user named them), else the plan's meta.model, which
    must be one of autorank's torch-only factories (a plan file never makes us import other code)."""
    spec = dict(plan.meta.get("model") or {})
    trusted_only = factory is None
    factory = factory or spec.get("factory")
    if not factory:
        raise BadInput("the plan's meta has no model factory: pass --model module:function "
                       "(and --model-kwargs JSON)")
    kwargs = kwargs if kwargs is not None else dict(spec.get("kwargs") or {})
    try:
        return build_model_from_factory(factory, kwargs, trusted_only=trusted_only)
    except Exception as e:  # import error, no such function, bad kwargs, untrusted module
        raise BadInput(f"cannot build the model {factory}(**{kwargs}): {type(e).__name__}: {e}; "
                       "pass --model module:function and --model-kwargs JSON") from e


def load_plan(path: str) -> Plan:
    if not Path(path).is_file():
        raise BadInput(f"plan file {path} does not exist: pass the plan written by `python -m autorank` "
                       "or `python -m autorank.export`")
    try:
        return Plan.load(path)
    except Exception as e:  # YAML/JSON syntax, unknown keys, bad choices, wrong format version
        raise BadInput(f"{path} is not a valid plan file: {e}") from e


def load_weights(model: torch.nn.Module, checkpoint: str) -> list[str]:
    """autorank.plan.load_base_weights, with bad input turned into BadInput. Returns the skipped
    (classifier head) keys."""
    if not Path(checkpoint).is_file():
        raise BadInput(f"checkpoint {checkpoint} does not exist: pass the base model's state dict "
                       "(torch.save(model.state_dict(), path))")
    try:
        return load_base_weights(model, checkpoint, skip_mismatched_head=True)
    except ValueError as e:
        raise BadInput(f"{e}; pass the checkpoint of the model the plan was made for") from e
    except Exception as e:  # not a torch file, truncated, pickled objects refused by weights_only
        raise BadInput(f"cannot read checkpoint {checkpoint}: {type(e).__name__}: {e}; it must be a "
                       "state dict saved with torch.save(model.state_dict(), path)") from e


def load_data(path: str):
    if not Path(path).is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"cannot read data file {path}: {type(e).__name__}: {e}; save it with "
                       'torch.save({"x": x, "y": y}, path)') from e
    if isinstance(d, dict):
        if "x" not in d or "y" not in d:
            raise BadInput(f"data file {path} holds a dict with keys {sorted(map(str, d))}: it needs "
                           '"x" (N, C, H, W) and "y" (N,) (and optionally "x_val" with "y_val")')
        x, y, xv, yv = d["x"], d["y"], d.get("x_val"), d.get("y_val")
        if (xv is None) != (yv is None):
            have, lack = ("x_val", "y_val") if yv is None else ("y_val", "x_val")
            raise BadInput(f"data file {path} has {have!r} but no {lack!r}: give both for a validation "
                           "accuracy, or neither")
    elif isinstance(d, (tuple, list)) and len(d) == 2:
        (x, y), xv, yv = d, None, None
    else:
        raise BadInput(f"data file {path} holds a {type(d).__name__}: it must be a dict "
                       '{"x": ..., "y": ...} or a tuple (x, y)')
    pairs = [("x", "y", x, y)] + ([("x_val", "y_val", xv, yv)] if xv is not None else [])
    for nx, ny, a, b in pairs:
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise BadInput(f"data file {path}: {nx!r} and {ny!r} must be tensors")
        if len(a) != len(b) or len(a) == 0:
            raise BadInput(f"data file {path}: {nx!r} has {len(a)} samples and {ny!r} {len(b)}: "
                           "they must be the same non-zero number")
        if b.is_floating_point() or b.is_complex():
            raise BadInput(f"data file {path}: {ny!r} must hold integer class labels, got {b.dtype}")
    return x.float(), y.long(), (xv.float() if xv is not None else None), (yv.long() if yv is not None else None)


def finetune_lr(plan: Plan, lr: float | None) -> float:
    """--lr, else the lr the plan's meta records (meta.lr or meta.finetune.lr), else DEFAULT_LR."""
    if lr is not None:
        return lr
    meta = plan.meta
    for v in (meta.get("lr"), (meta.get("finetune") or {}).get("lr") if isinstance(meta.get("finetune"), dict) else None):
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return DEFAULT_LR


def run(a: argparse.Namespace) -> int:
    torch.manual_seed(0)
    plan = load_plan(a.plan)
    try:
        kwargs = json.loads(a.model_kwargs) if a.model_kwargs else None
    except json.JSONDecodeError as e:
        raise BadInput(f"--model-kwargs is not valid JSON: {e}") from e
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadInput("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    model = build_model(plan, a.model, kwargs)
    if plan.fingerprint is not None:
        try:
            check_fingerprint(plan.fingerprint, model)
        except ValueError as e:
            raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                           "or export the plan again for this model") from e
    skipped = load_weights(model, a.checkpoint)
    if skipped:
        print(f"classifier head of another shape in the checkpoint, kept fresh on purpose: {', '.join(skipped)}")
    elif not a.keep_head:
        # The search fine-tuned a fresh head (the checkpoint's head belongs to the upstream task):
        # the same seeded initialisation as autorank.workload.models.replace_head.
        seed = a.seed if a.seed is not None else int(plan.meta.get("seed", 0))
        print(f"classifier head {fresh_head(model, seed)}: fresh (seed {seed}); --keep-head keeps the checkpoint's")
    x, y, xv, yv = load_data(a.data)

    # The fine-tuning mode the search costed: train mode (dropout live), BN in eval mode.
    base = finetune_mode(model, bn_eval=True)
    shape = plan.meta.get("input_shape") or None
    bs = a.batch_size or (int(shape[0]) if shape else 32)
    if bs < 1:
        raise BadInput(f"--batch-size must be >= 1, got {bs}")
    # one batch at the size the plan was costed for (fresh storage: a view would count all of x)
    xb = x[torch.arange(bs) % len(x)]
    try:
        predicted = predict_saved_bytes(base, xb, plan)
    except ValueError as e:  # fingerprint or layer names do not fit the model built here
        raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                       "or export the plan again for this model") from e
    except RuntimeError as e:  # the data's shape does not fit the model
        raise BadInput(f"the model cannot run on the data (x has shape {list(x.shape)}): {e}") from e
    n_classes = None
    with torch.no_grad():
        out = model(xb[:1])  # before the plan: leaves no warm-start state
    if out.dim() == 2:
        n_classes = out.shape[1]
    for name, labels in (("y", y), ("y_val", yv)):
        if labels is not None and n_classes is not None and (labels.min() < 0 or labels.max() >= n_classes):
            raise BadInput(f"data {name!r} has labels in [{int(labels.min())}, {int(labels.max())}] but the "
                           f"model has {n_classes} classes: build it with num_classes={int(labels.max()) + 1} "
                           "(--model-kwargs)")
    model = apply_plan(base, plan)  # in place; checked above on a copy
    finetune_mode(model, bn_eval=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInput("the plan trains no parameter: export a plan with at least one trained layer")

    measured = measure_saved_bytes(lambda: model(xb), model).activation_bytes
    pred = predicted.activation_bytes
    diff = 100 * (measured - pred) / pred if pred else 0.0
    line = (f"saved activations per step (batch {bs}): measured {measured:,} bytes, "
            f"predicted {pred:,} bytes ({diff:+.2f}%)")
    if shape and list(xb.shape) != [int(v) for v in shape]:
        line += f" [the plan was costed for input {list(shape)}, this data gives {list(xb.shape)}]"
    print(line)
    if measured != pred:
        print(f"warning: measured and predicted saved bytes differ by {measured - pred:+,} bytes: "
              "the cost model does not describe this model/plan exactly", file=sys.stderr)

    lr = finetune_lr(plan, a.lr)
    opt = torch.optim.SGD(params, lr=lr, momentum=a.momentum)
    print(f"fine-tuning {sum(p.numel() for p in params):,} parameters: SGD lr {lr:g}, momentum {a.momentum:g}, "
          f"batch {bs}, {a.epochs} epoch(s)")
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        perm = torch.randperm(len(x))
        total, n = 0.0, 0
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                print(f"error: loss is {loss.item()} at epoch {epoch + 1}, step {i // bs + 1}: "
                      "try a smaller --lr", file=sys.stderr)
                return 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        print(f"epoch {epoch + 1}/{a.epochs}: train loss {total / n:.4f}")
    print(f"training took {time.perf_counter() - t0:.1f} s")
    if xv is not None:
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(1) == yv).float().mean())
        finetune_mode(model, bn_eval=True)
        print(f"validation accuracy {acc:.4f}")
    if a.out:
        try:
            path = save_base_weights(model, a.out)  # plan removed for the save, keys of the plain model
        except OSError as e:
            raise BadInput(f"cannot write {a.out}: {e}") from e
        print(f"saved the fine-tuned base-model weights (no plan; load with "
              f"autorank.plan.load_base_weights or model.load_state_dict) to {path}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("plan")
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None,
                    help=f"SGD learning rate (default: the plan's meta lr if it records one, else {DEFAULT_LR})")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the plan's input_shape[0]")
    ap.add_argument("--model", default=None, help="module:function (default: the plan's meta.model)")
    ap.add_argument("--model-kwargs", default=None, help="JSON kwargs for --model")
    ap.add_argument("--out", default=None, help="save the fine-tuned base-model state dict here")
    ap.add_argument("--keep-head", action="store_true",
                    help="keep the checkpoint's classifier head (default: a fresh one, as the search trained)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the fresh head (default: the plan's meta.seed, the search's trainer.seed, else 0)")
    return ap.parse_args(argv)


def fresh_head(model: torch.nn.Module, seed: int) -> str:
    """Re-initialise the last nn.Linear in place, seeded, without touching the global RNG."""
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    lin = model.get_submodule(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(new.weight)
        if lin.bias is not None:
            lin.bias.copy_(new.bias)
    return name


def main(argv=None) -> int:
    a = parse_args(argv)  # argparse reports its own usage errors (exit 2)
    try:
        return run(a)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
