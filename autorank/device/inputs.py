"""What the device runner reads: the plan, the model it names, the base weights and the data.
Every mistake in them is a BadInput with the fix in its message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from autorank.device.checks import MB, check_weights_finite
from autorank.device.memory import memory_allowed
from autorank.models import classifier_name, replace_head
from autorank.plan import Plan, PlanError, build_model_from_factory, check_fingerprint, load_base_weights
from autorank.plan.plan import FineTuneSettings

DEFAULT_LR = 0.01  # the workload's fine-tuning default (conf trainer.lr)
MAX_LR = 1000.0  # SGD with a larger step leaves any model's weights at inf after one step


class BadInput(Exception):
    """Something the user passed is wrong; main prints `error: <message>` and exits 2."""


def settings(plan: Plan) -> FineTuneSettings | None:
    """The plan's fine-tuning settings (meta.finetune; older files: meta.model/lr/seed)."""
    try:
        return FineTuneSettings.from_plan(plan)
    except (TypeError, ValueError, OverflowError) as e:
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
    _check_shadow(plan, factory, kwargs, trusted_only)
    try:
        return build_model_from_factory(factory, kwargs, trusted_only=trusted_only)
    except Exception as e:  # import error, no such function, bad kwargs, untrusted module
        raise BadInput(f"cannot build the model {factory}(**{_short(kwargs)}): {type(e).__name__}: "
                       f"{_short(e)}; pass --model module:function and --model-kwargs JSON") from e


def _short(value, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_shadow(plan: Plan, factory: str, kwargs: dict, trusted_only: bool) -> None:
    """Build the model on the meta device first (shapes, no memory) and refuse, before a byte of
    weights is allocated, a model that is not the plan's (its fingerprint) or whose weights alone
    are above the memory this process may use. A factory that cannot build on the meta device is
    checked after the real build instead."""
    try:
        with torch.device("meta"):
            shadow = build_model_from_factory(factory, kwargs, trusted_only=trusted_only)
    except Exception:  # the real build below reports it (or the factory needs real tensors)
        return
    _check_fingerprint(plan, shadow)
    tensors = {id(t): t for t in [*shadow.parameters(), *shadow.buffers()]}.values()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    allowed = memory_allowed()
    if allowed is not None and weights > allowed[0]:
        raise BadInput(f"the model {factory}(**{_short(kwargs)}) has {weights / MB:,.0f} MB of weights, more "
                       f"than the {allowed[0] / MB:,.0f} MB this process may use ({allowed[1]}): "
                       "check the model kwargs (--model-kwargs, or the plan's)")


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
        skipped = load_base_weights(model, checkpoint, skip_mismatched_head=True)
    except ValueError as e:  # unreadable (random bytes, truncated, other pickles), or keys that do not fit
        hint = "" if str(e).startswith("cannot read") else "; pass the checkpoint of the model the plan was made for"
        raise BadInput(f"{e}{hint}") from e
    loaded = ((k, t) for k, t in model.state_dict().items() if k not in skipped)
    bad = check_weights_finite(loaded, f"checkpoint {checkpoint}")
    if bad:
        raise BadInput(bad)
    return skipped


def finetune_lr(plan: Plan, lr: float | None) -> float:
    """--lr, else the lr the plan's fine-tuning settings record, else DEFAULT_LR."""
    ft = settings(plan)
    if lr is None:
        lr = float(ft.lr) if ft is not None and ft.lr is not None else DEFAULT_LR
    if lr > MAX_LR:
        raise BadInput(f"learning rate {lr:g} is above {MAX_LR:g}: SGD would leave the weights infinite "
                       "after one step; pass --lr with a usual value (e.g. 0.01)")
    return lr


def check_labels(model: torch.nn.Module, xb: torch.Tensor, labels: dict[str, torch.Tensor | None]) -> None:
    """Every label must be a class of the model's output (one no-grad forward on one sample, before
    a plan is applied: it leaves no warm-start state)."""
    from autorank.cost.loss import logits_of

    with torch.no_grad():
        out = logits_of(model(xb[:1]))
    token = not xb.is_floating_point()
    if out.dim() != (3 if token else 2):
        return
    n_classes = out.shape[-1] if token else out.shape[1]
    for name, y in labels.items():
        if y is not None and (y.min() < 0 or y.max() >= n_classes):
            raise BadInput(f"data {name!r} has labels in [{int(y.min())}, {int(y.max())}] but the "
                           f"model has {n_classes} classes: build it with num_classes={int(y.max()) + 1} "
                           "(--model-kwargs)")


def _model_kwargs(text: str | None) -> dict | None:
    try:
        kwargs = json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise BadInput(f"--model-kwargs is not valid JSON: {e}") from e
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadInput("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return kwargs


def _check_fingerprint(plan: Plan, model: torch.nn.Module) -> None:
    """BadInput unless `model` (real or on the meta device) is the one the plan was made for."""
    if plan.fingerprint is None:
        return
    try:
        check_fingerprint(plan.fingerprint, model)
    except ValueError as e:
        raise BadInput(f"{e}; build the model the plan was made for (--model/--model-kwargs) "
                       "or export the plan again for this model") from e


def load_model(a: argparse.Namespace, plan: Plan, keep_head: bool = False) -> torch.nn.Module:
    """The plan's model with the checkpoint's weights and, unless --keep-head (or `keep_head`: a
    language model's output layer is its vocabulary, which fine-tuning keeps) or the checkpoint's
    head did not fit, a fresh head seeded as the search's (autorank.models.replace_head)."""
    model = build_model(plan, a.model, _model_kwargs(a.model_kwargs))
    _check_fingerprint(plan, model)
    skipped = load_weights(model, a.checkpoint)
    if skipped:
        print(f"classifier head of another shape in the checkpoint, kept fresh on purpose: {', '.join(skipped)}")
    elif keep_head:
        print("token data: the checkpoint's output layer kept (same vocabulary), as the search trained it")
    elif not a.keep_head:
        # The search fine-tuned a fresh head (the checkpoint's head belongs to the upstream task).
        ft = settings(plan)
        seed = a.seed if a.seed is not None else (ft.seed if ft is not None else 0)
        head = classifier_name(model)
        replace_head(model, model.get_submodule(head).out_features, seed=seed)
        print(f"classifier head {head}: fresh (seed {seed}); --keep-head keeps the checkpoint's")
    return model
