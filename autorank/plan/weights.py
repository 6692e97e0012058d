"""Base-model weights in and out, with or without a plan applied (torch only).

A plan swaps modules for wrappers that hold the original as `base_layer`, so a state dict taken
while a plan is applied has keys like `0.base_layer.weight` that a plain model does not take.
`save_base_weights` takes the plain model's state dict (plan removed, then put back);
`load_base_weights` loads into the plain model and fails loudly on any key that does not fit,
except - on purpose, and reported - a classifier head of another shape (an upstream checkpoint
loaded into a model built for the downstream classes keeps its fresh head).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from autorank.io import atomic_write
from autorank.plan.plan import original_modules


def classifier_head(model: nn.Module) -> str | None:
    """Name of the last nn.Linear of the model as it is without a plan (the classifier head that
    a downstream task replaces), or None."""
    names = [n for n, m in original_modules(model) if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from autorank.plan.apply import applied_plan, apply_plan, remove_plan

    plan = applied_plan(model)
    if plan is None:
        return model.state_dict()
    remove_plan(model)
    try:
        return model.state_dict()
    finally:
        apply_plan(model, plan, strict=False, allow_untrained=True)


def _load_failure(e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (torch's own message is a
    paragraph that also suggests weights_only=False, which would run the file's code)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return f"random bytes, or pickled objects other than tensors: {' '.join(detail.split())}"
    if isinstance(e, EOFError):
        return "the file ends early (empty or truncated)"
    first = text.split(". ", 1)[0].splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"


def read_weights_file(path, what: str = "checkpoint",
                      how: str = "torch.save(model.state_dict(), path)", mmap: bool = False) -> object:
    """torch.load(path, weights_only=True) on the CPU: tensors and plain containers only, a
    pickled object never runs. A file it cannot read (random bytes, truncated, a pickle of other
    objects, a directory) is a ValueError naming the file (`what`) and how to write one (`how`).
    mmap: the tensors stay in the file, mapped, and are read page by page as they are used (files
    in torch.save's zip format, the default since torch 1.6; an older file is read whole)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"cannot read {what} {p}: it is a directory; pass the file ({how})")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol ...": the refusal below says it
            warnings.simplefilter("ignore", UserWarning)
            if mmap:
                try:
                    return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
            return torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"cannot read {what} {p}: not a file torch.load(weights_only=True) reads "
                         f"({_load_failure(e)}); save one with {how}") from e


def _read_state(path_or_state_dict) -> tuple[dict, str]:
    if isinstance(path_or_state_dict, Mapping):
        state, where = path_or_state_dict, "the state dict"
    else:
        where = str(path_or_state_dict)
        state = read_weights_file(path_or_state_dict, mmap=True)  # copied into the model, then unmapped
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # Lightning checkpoint
        state = state["state_dict"]
        if state and all(str(k).startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} holds a {type(state).__name__}, not a state dict "
                         "(save one with torch.save(model.state_dict(), path))")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where} is not a state dict: {bad[0]!r} is not a tensor")
    odd = [k for k, v in state.items() if v.layout != torch.strided or v.is_meta]
    if odd:
        t = state[odd[0]]
        kind = "a meta tensor (a shape without values)" if t.is_meta else f"a {t.layout} tensor"
        raise ValueError(f"{where}: {odd[0]!r} is {kind}: a state dict holds dense tensors with their "
                         "values (save the model's own state_dict())")
    return dict(state), where


def load_base_weights(model: nn.Module, path_or_state_dict, *, skip_mismatched_head: bool = True) -> list[str]:
    """Load a state dict (a path read with torch.load(weights_only=True), a Lightning checkpoint's
    `state_dict` with its `model.` prefix, or a mapping) into `model`, in place.

    Every key must match the model without a plan (a plan applied to `model` is removed for the
    load and put back: the wrappers share the base layers' tensors). A missing or unexpected key,
    or a tensor of another shape, is a ValueError naming them - except, when
    skip_mismatched_head, the classifier head's (last nn.Linear's) tensors of another shape:
    those are skipped and the head keeps its current values. Returns the skipped keys."""
    from autorank.plan.apply import applied_plan, apply_plan, remove_plan

    state, where = _read_state(path_or_state_dict)
    plan = applied_plan(model)
    if plan is not None:
        remove_plan(model)
    try:
        own = model.state_dict()
        head = classifier_head(model)
        shape_diff = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
        skipped = [k for k in shape_diff if skip_mismatched_head and head is not None
                   and k.startswith(head + ".")]
        wrong = [k for k in shape_diff if k not in skipped]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if wrong or missing or unexpected:
            parts = []
            if wrong:
                parts.append("other shape: " + ", ".join(
                    f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}" for k in wrong[:5]))
            if missing:
                parts.append(f"missing {len(missing)} keys: {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys: {', '.join(unexpected[:5])}")
            hint = ""
            if any(".base_layer." in k for k in unexpected):
                hint = (" (keys with 'base_layer' come from a model saved while a plan was applied: "
                        "save with autorank.plan.save_base_weights, or remove_plan before state_dict())")
            raise ValueError(f"{where} does not fit the model: {'; '.join(parts)}{hint}")
        for k in skipped:
            state[k] = own[k]
        model.load_state_dict(state, strict=True)
    finally:
        if plan is not None:
            apply_plan(model, plan, strict=False, allow_untrained=True)
    return skipped


def save_base_weights(model: nn.Module, path) -> Path:
    """torch.save the state dict of `model` without its plan (keys as in the plain model, so
    load_base_weights or model.load_state_dict take it), written atomically (temp file in the same
    folder + os.replace). A plan applied to `model` is removed for the save and applied again
    (fresh wrappers: ASI warm-start state restarts; parameters are the same tensors, so an
    optimizer holding them stays valid). Returns the path."""
    state = _plain_state_dict(model)
    return atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


TRUSTED_FACTORY_MODULES = ("autorank.models",)


def build_model_from_factory(factory: str, kwargs: dict | None = None, *, trusted_only: bool = True) -> nn.Module:
    """Build a model from a 'module:function' (or 'module.function') factory with `kwargs`.

    autorank's factories (autorank.models) import only torch and torchvision. A module named by
    a plan written before they moved there (autorank.workload.models) is read as autorank.models.
    trusted_only: refuse a factory outside TRUSTED_FACTORY_MODULES, so that a plan file (or a
    study's storage) naming a module does not make us import arbitrary code; pass False where the
    user named the factory on the command line. Raises ValueError / ImportError / TypeError from
    the factory."""
    import importlib

    from autorank.models import FACTORIES, FACTORY_ALIASES

    if ":" in factory:
        module, fn = factory.split(":", 1)
    else:
        module, _, fn = factory.rpartition(".")
    if not module or not fn:
        raise ValueError(f"model factory {factory!r} is not 'module:function'")
    module = FACTORY_ALIASES.get(module, module)
    if trusted_only and module not in TRUSTED_FACTORY_MODULES:
        raise ValueError(f"model factory {factory!r} is not one of autorank's ({', '.join(TRUSTED_FACTORY_MODULES)}); "
                         "name it explicitly to trust it")
    if trusted_only and fn not in FACTORIES:
        raise ValueError(f"model factory {factory!r}: {module} has no function {fn!r} among its "
                         f"factories ({', '.join(FACTORIES)})")
    mod = importlib.import_module(module)
    fn_obj = getattr(mod, fn, None)
    if not callable(fn_obj):
        raise ValueError(f"model factory {factory!r}: {module} has no function {fn!r}")
    model = fn_obj(**dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {factory!r} returned a {type(model).__name__}, not an nn.Module")
    return model
