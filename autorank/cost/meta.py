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
import functools
import itertools
import logging
import weakref

import torch
import torch.nn as nn

# torch documents TorchDispatchMode under this private module and has no public alias for it
from torch.utils._python_dispatch import TorchDispatchMode

from autorank.plan import applied_plan, apply_plan, remove_plan
from autorank.shortcut import TuckerLayer

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
        apply_plan(model, plan)
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
        with shadow(model, plan) as m:
            return fn(m, meta_tensor(example_input).requires_grad_(example_input.requires_grad))
    except META_FAILURES as exc:
        fell_back(exc)
    return fn(real_copy(model, plan), example_input)


@contextlib.contextmanager
def shadow(model: nn.Module, plan=None):
    """A meta copy of `model` with `plan` applied (as it is for plan=None), for one trace, run
    under FastMeta (enter a FlopCounterMode inside it).

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
            apply_plan(m, plan)
        if needs_data(m):
            raise NeedsData
        with FastMeta():
            yield m
        ok = True
    finally:
        if plan is not None:
            remove_plan(m)
        for p in m.parameters():
            p.grad = None
        if ok and restorable:
            _SHADOWS[model] = entry


_OUT_CACHE: dict = {}  # (op, argument metadata) -> output metadata (or None: not cacheable)
_OUT_CACHE_MAX = 20_000


_ACTIVE: list = []  # the FastMeta modes entered, innermost last


def active_fast_meta():
    """The innermost FastMeta mode entered (inside `shadow`), or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def _meta_key(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.device.type)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *map(_meta_key, a))
    if isinstance(a, dict):
        return ("D", *((k, _meta_key(v)) for k, v in sorted(a.items())))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                   torch.memory_format)):
        return a
    raise TypeError  # not a plain value: no cache


def _describe(out, args_kwargs):
    """Output metadata if the outputs are fresh, dense, unshared meta tensors; else None. An
    output sharing an argument's storage is not fresh, whatever the schema says
    (`_unsafe_view` has no alias annotation but returns a view)."""
    outs = out if isinstance(out, tuple) else (out,)
    seen = {t.untyped_storage()._cdata for t in tensors_in(args_kwargs)}
    desc = []
    for t in outs:
        if t is None:
            desc.append(None)
            continue
        if not isinstance(t, torch.Tensor) or not t.is_meta or t.storage_offset() != 0:
            return None
        fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        s = t.untyped_storage()
        if s._cdata in seen or s.nbytes() != fresh.untyped_storage().nbytes():
            return None
        seen.add(s._cdata)
        desc.append((tuple(t.shape), t.stride(), t.dtype))
    return isinstance(out, tuple), tuple(desc)


# mutate only buffers' data (running statistics), never metadata: on meta, nothing to do
_STAT_UPDATES = {aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
                 aten._native_batch_norm_legit_functional.default}


def tensors_in(tree) -> list[torch.Tensor]:
    """The tensors in nested lists / tuples / dicts (a lean tree_flatten: ops' arguments)."""
    out: list[torch.Tensor] = []
    stack = [tree]
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return out


@functools.lru_cache(maxsize=None)
def _op_kind(func) -> str:
    """fresh: outputs are new tensors, nothing mutated (or only running statistics);
    inplace: a pointwise op returning its mutated self; other: run as it is."""
    schema = func._schema
    if func in _STAT_UPDATES or not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)):
        return "fresh"
    if (torch.Tag.pointwise in func.tags and schema.name.endswith("_") and len(schema.returns) == 1
            and schema.returns[0].alias_info is not None and schema.returns[0].alias_info.is_write):
        return "inplace"
    return "other"


class FastMeta(TorchDispatchMode):
    """Fast, shape-only meta execution.

    - Ops with fresh outputs: many meta kernels are Python references (hardtanh, batch norm:
      milliseconds a call). Their outputs' shapes, strides and dtypes are a function of the
      arguments' metadata and scalars, so they are computed once and cached; later calls get new
      empty meta tensors with that metadata (a fresh storage each, as the kernel would give).
    - In-place pointwise ops (relu_, hardtanh_, add_) change no metadata: self is returned.
    - torch.geqrf has no meta kernel: shape-only outputs in LAPACK's layout.
    - Eval-mode batch norm returns empty save_mean / save_invstd, as the CPU and cuDNN kernels do
      (the meta kernel returns C-sized ones; a live-memory count would see them).
    Enter it before (outside) a FlopCounterMode: the counter sees each op first and counts it
    from its shapes, then this mode produces the outputs. Observers (`observing`) see every op's
    outputs here, without a dispatch mode of their own (one Python mode less per op)."""

    def __init__(self):
        super().__init__()
        self.observers: list = []  # objects with observe(func, args, kwargs, out)

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def observing(self, observer):
        """Within: observer.observe(func, args, kwargs, out) after every op this mode runs."""
        self.observers.append(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.dispatch(func, args, kwargs)
        if func is aten.native_batch_norm.default and isinstance(out[1], torch.Tensor) and out[1].is_meta:
            training = args[5] if len(args) > 5 else kwargs["training"]
            if not training:  # the CPU and cuDNN kernels return empty save_mean / save_invstd
                out = (out[0], out[1].new_empty((0,)), out[2].new_empty((0,)))
        for observer in self.observers:
            observer.observe(func, args, kwargs, out)
        return out

    def dispatch(self, func, args, kwargs):
        if func is aten.geqrf.default and args[0].is_meta:
            a = args[0]
            m, n = a.shape[-2:]
            stride = a.new_empty(a.shape).transpose(-2, -1).contiguous().transpose(-2, -1).stride()
            return (torch.empty_strided(a.shape, stride, dtype=a.dtype, device="meta"),
                    a.new_empty((*a.shape[:-2], min(m, n))))
        kind = _op_kind(func)
        if kind == "inplace" and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]  # in-place pointwise: self, metadata unchanged
        if kind != "fresh" or not all(t.is_meta for t in tensors_in((args, kwargs))):
            return func(*args, **kwargs)
        try:
            key = (func, _meta_key(args), _meta_key(kwargs))
        except TypeError:
            return func(*args, **kwargs)
        desc = _OUT_CACHE.get(key, False)
        if desc is False:
            out = func(*args, **kwargs)
            if len(_OUT_CACHE) >= _OUT_CACHE_MAX:
                _OUT_CACHE.clear()
            _OUT_CACHE[key] = _describe(out, (args, kwargs))
            return out
        if desc is None:
            return func(*args, **kwargs)
        is_tuple, outs = desc
        new = tuple(None if d is None else torch.empty_strided(d[0], d[1], dtype=d[2], device="meta") for d in outs)
        return new if is_tuple else new[0]
