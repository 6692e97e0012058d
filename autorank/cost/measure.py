"""Measure what autograd saves for backward while a function runs."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from autorank.cost.meta import storage_key


@dataclasses.dataclass
class SavedBytes:
    """Bytes saved for backward. A storage saved several times (or through several views) is
    counted once, at the full size of the storage it keeps alive. parameter_bytes: saved storages
    that are parameters or buffers (resident anyway), apart from activation_bytes."""

    activation_bytes: int
    parameter_bytes: int
    n_tensors: int
    by_dtype: dict[str, int]
    n_storages: int = 0


def measure_saved_bytes(fn: Callable[[], object], model: nn.Module | Iterable[torch.Tensor] | None = None) -> SavedBytes:
    """Run fn() under saved_tensors_hooks and count the bytes autograd saves.

    Resident tensors (not counted as activations): nn.Parameter instances, the parameters and
    buffers of every nn.Module that runs inside fn (BN running statistics are saved by
    batch_norm's node), and, with `model`, all of its parameters and buffers (tensors, for a
    functional fn) - matched by storage, so weight.t() saved by linear counts as the weight.
    A saved tensor is held only by a weak reference: nothing stays alive longer than in a step
    without the hooks (the device runner measures on its first real step, at its peak). A freed
    storage whose pointer comes back for a new one is told apart by its dead reference.
    Empty storages (eval-mode BN's save_mean) count 0 bytes.
    """
    resident: set[tuple] = set()
    if model is not None:
        tensors = list(model.parameters()) + list(model.buffers()) if isinstance(model, nn.Module) else list(model)
        resident = {storage_key(t) for t in tensors if t.numel() > 0}
    live: dict[tuple, weakref.ref] = {}  # storage key -> a saved tensor on it, while one lives
    counted: list[tuple[int, bool, str]] = []  # (bytes, is a parameter, dtype), once per storage
    n_tensors = 0

    def pack(t: torch.Tensor):
        nonlocal n_tensors
        n_tensors += 1
        key = storage_key(t)
        ref = live.get(key)
        if (ref is None or ref() is None) and t.untyped_storage().nbytes() > 0:
            is_param = isinstance(t, nn.Parameter) or key in resident
            counted.append((t.untyped_storage().nbytes(), is_param, str(t.dtype).removeprefix("torch.")))
        live[key] = weakref.ref(t)
        return t

    def note_module(module, args):
        # every module that runs has its own parameters and buffers resident
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.numel() > 0:
                resident.add(storage_key(t))

    handle = nn.modules.module.register_module_forward_pre_hook(note_module)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        handle.remove()
    activation = parameter = 0
    by_dtype: dict[str, int] = {}
    for nbytes, is_param, dtype in counted:
        if is_param:
            parameter += nbytes
        else:
            activation += nbytes
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    del out
    return SavedBytes(activation, parameter, n_tensors, by_dtype, n_storages=len(counted))
