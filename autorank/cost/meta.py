"""Meta-device shadows: the cost model's traces need shapes, dtypes and storages, never values.

A shadow is a copy of a model whose parameters and buffers live on the meta device (no data,
no compute: a forward of MCUNet at batch 128 takes milliseconds instead of seconds). Storage
sharing between parameters/buffers is kept (views of one real storage are views of one meta
storage), requires_grad flags and train/eval modes are copied. One shadow per live model is
cached and reused while the model's structure is unchanged (same modules, parameters, buffers,
flags: `_signature`); a plan is applied to it for one trace and removed after (remove_plan
restores it exactly).

What cannot run on meta: anything that reads values. HOSVD_eps layers choose their ranks from
the data (`needs_data`); `run_planned` then traces a real-tensor copy instead. It does the same
when an op has no meta kernel or reads values (META_FAILURES), so a module the meta device cannot
run costs time, never a wrong answer; any other error is a bug and propagates.
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

from autorank.cost.attention import CpuAttention
from autorank.cost.fastmeta import FastMeta
from autorank.plan import applied_plan, apply_plan, remove_plan
from autorank.shortcut import TuckerLayer

_SHADOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

log = logging.getLogger(__name__)


def _signature(model: nn.Module) -> tuple:
    """What a shadow copies: module identities and modes, tensors' identities, shapes and flags,
    the applied plan."""
    mods = tuple((name, id(m), m.training) for name, m in model.named_modules())
    tensors = tuple(
        (id(t), t.requires_grad, tuple(t.shape), t.dtype, t.stride(), t.storage_offset(), t.device)
        for t in itertools.chain(model.parameters(), model.buffers())
    )
    return mods, tensors, id(applied_plan(model))


def storage_key(t: torch.Tensor) -> tuple:
    """The storage t keeps alive (tensors sharing it share the key). Meta storages have no
    address: the StorageImpl's identity stands in (torch has no public name for it; callers
    hold the tensors, so it is never reused while a key is in use)."""
    s = t.untyped_storage()
    if s.device.type == "meta":
        return ("meta", s._cdata, s.nbytes())
    return (str(s.device), s.data_ptr(), s.nbytes())


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
    return any(isinstance(m, TuckerLayer) and m.needs_data for m in model.modules())


FALLBACKS: collections.Counter = collections.Counter()  # reason -> real-tensor traces taken


def fell_back(exc: BaseException) -> None:
    """Note a meta trace that gave way to a real one (NeedsData, or an error: logged)."""
    reason = "needs data" if isinstance(exc, NeedsData) else f"{type(exc).__name__}: {exc}"
    FALLBACKS[reason] += 1
    if not isinstance(exc, NeedsData):
        log.debug("meta trace failed, tracing real tensors: %s", reason)


class NeedsData(Exception):
    """Raised inside a shadow trace that must run on real tensors instead."""


# What a shadow trace may raise where a real-tensor trace would not: NeedsData, an op without a
# meta kernel (NotImplementedError), an op that reads values ("cannot be called on meta
# tensors", data-dependent shapes: RuntimeError). Anything else (an AttributeError after a
# rename, a TypeError) is a bug, and is not hidden behind a slower trace.
META_FAILURES = (NeedsData, NotImplementedError, RuntimeError)


def real_copy(model: nn.Module, plan=None) -> nn.Module:
    """A deep copy of `model` with `plan` applied (the real-tensor path)."""
    model = copy.deepcopy(model)
    if plan is not None:
        apply_plan(model, plan, allow_untrained=True)
    return model


_REAL_ONLY = [0]  # > 0 inside real_tensors_only()


@contextlib.contextmanager
def real_tensors_only():
    """Within: predictions trace a real-tensor deep copy, never a meta shadow (the reference
    path, slower: to check the fast path against it, or to debug it)."""
    _REAL_ONLY[0] += 1
    try:
        yield
    finally:
        _REAL_ONLY[0] -= 1


def run_planned(model: nn.Module, plan, example_input: torch.Tensor, fn):
    """fn(planned model, x) on a meta shadow of `model` with `plan` applied (x: a meta tensor
    like example_input); on a real deep copy with example_input itself where the shadow cannot
    run it (META_FAILURES), and always inside real_tensors_only(). `model` is never changed."""
    if _REAL_ONLY[0]:
        return fn(real_copy(model, plan), example_input)
    try:
        with shadow(model, plan, cuda=example_input.is_cuda) as m:
            return fn(m, meta_tensor(example_input).requires_grad_(example_input.requires_grad))
    except META_FAILURES as exc:
        fell_back(exc)
    return fn(real_copy(model, plan), example_input)


@contextlib.contextmanager
def shadow(model: nn.Module, plan=None, cuda: bool = False):
    """A meta copy of `model` with `plan` applied (as it is for plan=None), for one trace, run
    under FastMeta (enter a FlopCounterMode inside it) and, standing for a CPU step (not cuda),
    CpuAttention (attention kernels as the CPU picks them).

    Raises NeedsData when the planned model needs real values. The shadow is cached for the
    next call unless the trace failed or it could not be restored (a plan that replaced one the
    model already had)."""
    sig = _signature(model)
    entry = _SHADOWS.pop(model, None)  # taken while in use: a nested call builds its own
    if entry is None or entry[0] != sig:
        entry = (sig, meta_copy(model))
    m = entry[1]
    restorable = plan is None or applied_plan(m) is None
    ok = False
    try:
        if plan is not None:
            apply_plan(m, plan, allow_untrained=True)
        if needs_data(m):
            raise NeedsData
        with FastMeta(), (contextlib.nullcontext() if cuda else CpuAttention()):
            yield m
        ok = True
    finally:
        if plan is not None:
            remove_plan(m)
        for p in m.parameters():
            p.grad = None
        if ok and restorable:
            _SHADOWS[model] = entry
