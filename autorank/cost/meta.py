"""Meta-device shadows: the cost model's traces need shapes, dtypes and storages, never values.

A shadow is a copy of a model whose parameters and buffers live on the meta device (no data,
no compute: a forward of MCUNet at batch 128 takes milliseconds instead of seconds). Storage
sharing between parameters/buffers is kept (views of one real storage are views of one meta
storage), requires_grad flags and train/eval modes are copied. One shadow per live model is
cached and reused while the model's structure is unchanged (same modules, parameters, buffers,
flags: `_signature`); a plan is applied to it for one trace and removed after (remove_plan
restores it exactly).

What cannot run on meta: anything that reads values. HOSVD_eps layers choose their ranks from
the data (`needs_data`); callers then fall back to a real-tensor trace. The same fallback is
taken on any error in a meta trace, so a module the meta device cannot run costs time, never
a wrong answer.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import logging
import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

_STATE_ATTR = "_autorank_plan_state"  # autorank.plan.apply's marker of an applied plan
_SHADOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

aten = torch.ops.aten
log = logging.getLogger(__name__)


def _signature(model: nn.Module) -> tuple:
    """What a shadow copies: module identities and modes, tensors' identities, shapes and flags,
    the applied plan."""
    mods = tuple((name, id(m), m.training) for name, m in model.named_modules())
    tensors = tuple(
        (id(t), t.requires_grad, tuple(t.shape), t.dtype, t.stride(), t.storage_offset(), t.device)
        for t in itertools.chain(model.parameters(), model.buffers())
    )
    return mods, tensors, id(getattr(model, _STATE_ATTR, None))


def meta_tensor(t: torch.Tensor, storages: dict | None = None) -> torch.Tensor:
    """A meta tensor with t's shape, strides, offset and dtype. With `storages` (real storage
    key -> meta storage), tensors sharing a real storage share the meta one."""
    if storages is None:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    s = t.untyped_storage()
    key = (str(s.device), s.data_ptr(), s.nbytes()) if s.data_ptr() else (id(t),)
    base = storages.get(key)
    if base is None:
        base = storages[key] = torch.empty(s.nbytes(), dtype=torch.uint8, device="meta").untyped_storage()
    return torch.empty(0, dtype=t.dtype, device="meta").set_(base, t.storage_offset(), t.shape, t.stride())


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every parameter and buffer on the meta device."""
    memo: dict[int, object] = {}
    storages: dict = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(meta_tensor(p, storages), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = meta_tensor(b, storages)
    return copy.deepcopy(model, memo)


def needs_data(model: nn.Module) -> bool:
    """Whether a trace must see real values: HOSVD_eps layers pick their ranks from the data."""
    return any(hasattr(m, "factorizer") and hasattr(m, "eps") and not hasattr(m, "ranks")
               for m in model.modules())


FALLBACKS: collections.Counter = collections.Counter()  # reason -> real-tensor traces taken


def fell_back(exc: BaseException) -> None:
    """Note a meta trace that gave way to a real one (NeedsData, or an error: logged)."""
    reason = "needs data" if isinstance(exc, NeedsData) else f"{type(exc).__name__}: {exc}"
    FALLBACKS[reason] += 1
    if not isinstance(exc, NeedsData):
        log.debug("meta trace failed, tracing real tensors: %s", reason)


class NeedsData(Exception):
    """Raised inside a shadow trace that must run on real tensors instead."""


@contextlib.contextmanager
def shadow(model: nn.Module, plan=None):
    """A meta copy of `model` with `plan` applied (as it is for plan=None), for one trace.

    Raises NeedsData when the planned model needs real values. The shadow is cached for the
    next call unless the trace failed or it could not be restored (a plan that replaced one the
    model already had)."""
    from autorank.plan import apply_plan, remove_plan

    sig = _signature(model)
    entry = _SHADOWS.pop(model, None)  # taken while in use: a nested call builds its own
    if entry is None or entry[0] != sig:
        entry = (sig, meta_copy(model))
    m = entry[1]
    restorable = plan is None or getattr(m, _STATE_ATTR, None) is None
    ok = False
    try:
        if plan is not None:
            apply_plan(m, plan)
        if needs_data(m):
            raise NeedsData
        yield m
        ok = True
    finally:
        if plan is not None:
            remove_plan(m)
        for p in m.parameters():
            p.grad = None
        if ok and restorable:
            _SHADOWS[model] = entry


class MetaLinalg(TorchDispatchMode):
    """Shape-only stand-ins for the linear-algebra ops with no meta kernel (torch.geqrf).

    Enter it before (outside) a FlopCounterMode: the counter sees the op first and counts it from
    its shapes, then this mode produces outputs of the right shapes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.geqrf.default and args[0].is_meta:
            a = args[0]
            m, n = a.shape[-2:]
            # LAPACK's layout: the reflectors in column-major (Fortran) order
            stride = a.new_empty(a.shape).transpose(-2, -1).contiguous().transpose(-2, -1).stride()
            return (torch.empty_strided(a.shape, stride, dtype=a.dtype, device="meta"),
                    a.new_empty((*a.shape[:-2], min(m, n))))
        return func(*args, **kwargs)
