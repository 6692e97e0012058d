"""FastMeta: fast, shape-only execution on the meta device, for the cost model's shadows
(autorank.cost.meta). Also `tensors_in`, the lean tree flatten the cost model's modes share."""

from __future__ import annotations

import contextlib
import functools

import torch

# torch documents TorchDispatchMode under this private module and has no public alias for it
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

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
        self.observers: list = []  # objects with observe(out, inputs, fresh, func, args)

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def observing(self, observer):
        """Within: observer.observe(out, inputs, fresh, func, args) after every op this mode runs
        (inputs: the argument tensors; fresh: see dispatch)."""
        self.observers.append(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tensors_in((args, kwargs))
        out, fresh = self.dispatch(func, args, kwargs, inputs)
        if func is aten.native_batch_norm.default and isinstance(out[1], torch.Tensor) and out[1].is_meta:
            training = args[5] if len(args) > 5 else kwargs["training"]
            if not training:  # the CPU and cuDNN kernels return empty save_mean / save_invstd
                out = (out[0], out[1].new_empty((0,)), out[2].new_empty((0,)))
        for observer in self.observers:
            observer.observe(out, inputs, fresh, func, args)
        return out

    def dispatch(self, func, args, kwargs, inputs) -> tuple[object, bool | None]:
        """(outputs, fresh): fresh is True when every output is a new storage made here, False
        when the output is an argument itself, None when the kernel ran (it may alias)."""
        if func is aten.geqrf.default and args[0].is_meta:
            a = args[0]
            m, n = a.shape[-2:]
            stride = a.new_empty(a.shape).transpose(-2, -1).contiguous().transpose(-2, -1).stride()
            return (torch.empty_strided(a.shape, stride, dtype=a.dtype, device="meta"),
                    a.new_empty((*a.shape[:-2], min(m, n)))), True
        kind = _op_kind(func)
        if kind == "inplace" and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0], False  # in-place pointwise: self, metadata unchanged
        if kind != "fresh" or not all(t.is_meta for t in inputs):
            return func(*args, **kwargs), None
        try:
            key = (func, _meta_key(args), _meta_key(kwargs))
        except TypeError:
            return func(*args, **kwargs), None
        desc = _OUT_CACHE.get(key, False)
        if desc is False:
            out = func(*args, **kwargs)
            if len(_OUT_CACHE) >= _OUT_CACHE_MAX:
                _OUT_CACHE.clear()
            _OUT_CACHE[key] = _describe(out, (args, kwargs))
            return out, None
        if desc is None:
            return func(*args, **kwargs), None
        is_tuple, outs = desc
        new = tuple(None if d is None else torch.empty_strided(d[0], d[1], dtype=d[2], device="meta") for d in outs)
        return (new if is_tuple else new[0]), True
