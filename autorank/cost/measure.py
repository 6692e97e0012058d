"""Measure what autograd saves for backward while a function runs."""

from __future__ import annotations

import dataclasses
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
    functional fn) - matched by storage, so weight.t() saved by linear counts as the weight. Every saved storage is
    held until the measurement ends so that a freed pointer can never be taken for a new one.
    Empty storages (eval-mode BN's save_mean) count 0 bytes.
    """
    resident: set[tuple] = set()
    if model is not None:
        tensors = list(model.parameters()) + list(model.buffers()) if isinstance(model, nn.Module) else list(model)
        resident = {storage_key(t) for t in tensors if t.numel() > 0}
    seen: dict[tuple, tuple[torch.UntypedStorage, bool, str]] = {}
    n_tensors = 0

    def pack(t: torch.Tensor):
        nonlocal n_tensors
        n_tensors += 1
        key = storage_key(t)
        if key not in seen and t.untyped_storage().nbytes() > 0:
            is_param = isinstance(t, nn.Parameter) or key in resident
            seen[key] = (t.untyped_storage(), is_param, str(t.dtype).removeprefix("torch."))
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
    for storage, is_param, dtype in seen.values():
        if is_param:
            parameter += storage.nbytes()
        else:
            activation += storage.nbytes()
            by_dtype[dtype] = by_dtype.get(dtype, 0) + storage.nbytes()
    del out
    return SavedBytes(activation, parameter, n_tensors, by_dtype, n_storages=len(seen))
