"""What the device runner reads: the plan, the model it names, the base weights and the data.
Every mistake in them is a BadInput with the fix in its message."""

from __future__ import annotations

from pathlib import Path

import torch

from autorank.plan import Plan, PlanError, build_model_from_factory, load_base_weights, read_weights_file
from autorank.plan.plan import FineTuneSettings

DEFAULT_LR = 0.01  # the workload's fine-tuning default (conf trainer.lr)


class BadInput(Exception):
    """Something the user passed is wrong; main prints `error: <message>` and exits 2."""


def settings(plan: Plan) -> FineTuneSettings | None:
    """The plan's fine-tuning settings (meta.finetune; older files: meta.model/lr/seed)."""
    try:
        return FineTuneSettings.from_plan(plan)
    except (TypeError, ValueError) as e:
        raise BadInput(f"the plan's fine-tuning settings are malformed: {e}") from e


def build_model(plan: Plan, factory: str | None, kwargs: dict | None) -> torch.nn.Module:
    """--model/--model-kwargs (trusted: the user named them), else the plan's model factory, which
    must be one of autorank's torch-only factories (a plan file never makes us import other code)."""
    ft = settings(plan)
    trusted_only = factory is None
    factory = factory or (ft.model_factory if ft else None)
    if not factory:
        raise BadInput("the plan records no model factory: pass --model module:function "
                       "(and --model-kwargs JSON)")
    kwargs = kwargs if kwargs is not None else dict(ft.model_kwargs if ft else {})
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
    except PlanError as e:  # a directory, binary, empty, YAML/JSON syntax, unknown keys, bad choices, version
        raise BadInput(str(e)) from e


def load_weights(model: torch.nn.Module, checkpoint: str) -> list[str]:
    """autorank.plan.load_base_weights, with bad input turned into BadInput. Returns the skipped
    (classifier head) keys."""
    if not Path(checkpoint).is_file():
        raise BadInput(f"checkpoint {checkpoint} does not exist: pass the base model's state dict "
                       "(torch.save(model.state_dict(), path))")
    try:
        return load_base_weights(model, checkpoint, skip_mismatched_head=True)
    except ValueError as e:  # unreadable (random bytes, truncated, other pickles), or keys that do not fit
        hint = "" if str(e).startswith("cannot read") else "; pass the checkpoint of the model the plan was made for"
        raise BadInput(f"{e}{hint}") from e


def _read_data(path: str):
    """(x, y, x_val, y_val) as stored, x_val/y_val None when absent."""
    if not Path(path).is_file():
        raise BadInput(f"data file {path} does not exist")
    try:
        d = read_weights_file(path, what="data file", how='torch.save({"x": x, "y": y}, path)')
    except ValueError as e:
        raise BadInput(str(e)) from e
    if isinstance(d, (tuple, list)) and len(d) == 2:
        return d[0], d[1], None, None
    if not isinstance(d, dict):
        raise BadInput(f"data file {path} holds a {type(d).__name__}: it must be a dict "
                       '{"x": ..., "y": ...} or a tuple (x, y)')
    if "x" not in d or "y" not in d:
        raise BadInput(f"data file {path} holds a dict with keys {sorted(map(str, d))}: it needs "
                       '"x" (N, C, H, W) and "y" (N,) (and optionally "x_val" with "y_val")')
    xv, yv = d.get("x_val"), d.get("y_val")
    if (xv is None) != (yv is None):
        have, lack = ("x_val", "y_val") if yv is None else ("y_val", "x_val")
        raise BadInput(f"data file {path} has {have!r} but no {lack!r}: give both for a validation "
                       "accuracy, or neither")
    return d["x"], d["y"], xv, yv


def load_data(path: str):
    """(x, y long, x_val | None, y_val long | None) from a torch.save'd file: x float (images),
    or x integer (N, L) tokens with y (N, L) next-token labels (a language model: x kept long)."""
    x, y, xv, yv = _read_data(path)
    pairs = [("x", "y", x, y)] + ([("x_val", "y_val", xv, yv)] if xv is not None else [])
    for nx, ny, a, b in pairs:
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise BadInput(f"data file {path}: {nx!r} and {ny!r} must be tensors")
        if len(a) != len(b) or len(a) == 0:
            raise BadInput(f"data file {path}: {nx!r} has {len(a)} samples and {ny!r} {len(b)}: "
                           "they must be the same non-zero number")
        if b.is_floating_point() or b.is_complex():
            raise BadInput(f"data file {path}: {ny!r} must hold integer class labels, got {b.dtype}")
    tokens = not x.is_floating_point()
    if tokens and any(b.shape != a.shape for _, _, a, b in pairs):
        raise BadInput(f"data file {path}: integer x is read as tokens (N, L), whose labels y are the next "
                       f"tokens, of x's shape; got x {list(x.shape)}, y {list(y.shape)}")

    def as_x(t):
        return None if t is None else (t.long() if tokens else t.float())

    return as_x(x), y.long(), as_x(xv), (yv.long() if yv is not None else None)


def loss_kind(x: torch.Tensor) -> str:
    """The training loss the data asks for (autorank.cost.loss): "token" for integer x (a language
    model's tokens), else "class"."""
    return "class" if x.is_floating_point() else "token"


def finetune_lr(plan: Plan, lr: float | None) -> float:
    """--lr, else the lr the plan's fine-tuning settings record, else DEFAULT_LR."""
    if lr is not None:
        return lr
    ft = settings(plan)
    return float(ft.lr) if ft is not None and ft.lr is not None else DEFAULT_LR


def check_labels(model: torch.nn.Module, xb: torch.Tensor, labels: dict[str, torch.Tensor | None]) -> None:
    """Every label must be a class of the model's output (one no-grad forward on one sample, before
    a plan is applied: it leaves no warm-start state)."""
    from autorank.cost.loss import logits_of

    with torch.no_grad():
        out = logits_of(model(xb[:1]))
    token = loss_kind(xb) == "token"
    if out.dim() != (3 if token else 2):
        return
    n_classes = out.shape[-1] if token else out.shape[1]
    for name, y in labels.items():
        if y is not None and (y.min() < 0 or y.max() >= n_classes):
            raise BadInput(f"data {name!r} has labels in [{int(y.min())}, {int(y.max())}] but the "
                           f"model has {n_classes} classes: build it with num_classes={int(y.max()) + 1} "
                           "(--model-kwargs)")
