"""Live tensor memory: the bytes of every storage the ops of a training step allocate, while alive.

`LiveBytes` is a TorchDispatchMode: every storage an op returns that none of its inputs shares is
a new allocation, counted until Python frees it (a weakref callback on the untyped storage: torch
keeps a storage's Python object alive exactly as long as the storage itself). The same mode runs
on real tensors (`measure_peak_training_bytes`: the reference the predictor is tested against)
and on a meta shadow (autorank.cost.peak: the prediction), so both count the same things.

Why our own mode rather than a library (checked on torch 2.14, CPU):
- torch.profiler(profile_memory=True) reports CPU allocations per op, but its per-allocation
  timeline is only reachable through the deprecated `export_memory_timeline` or the private
  `kineto_results`; the public `[memory]` events hold only frees outside ops.
- torch.distributed._tools.mem_tracker.MemTracker does the same bookkeeping (weakrefs on
  storages) but is private, FSDP-oriented, and tracks per module rather than one step's peak.
What this counts: tensors (activations, saved tensors, gradients, optimizer state, temporaries
between ops). What it cannot see: memory a kernel allocates and frees inside one op (oneDNN
reorders and scratchpads on the CPU, cuDNN workspaces on a GPU), allocator rounding and
fragmentation. scripts/check_peak_cpu.py and check_peak_cuda.py show the size of that gap.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import weakref

import torch
import torch.nn as nn

# torch documents TorchDispatchMode under this private module and has no public alias for it
from torch.utils._python_dispatch import TorchDispatchMode

from autorank.cost.fastmeta import tensors_in
from autorank.cost.loss import check_loss, training_loss

OPTIMIZERS = ("sgd", "adam", "adamw")


def _key(s: torch.UntypedStorage) -> int:
    # the StorageImpl's identity (meta storages have no address); a key is dropped when its
    # storage is freed, so a reused one never meets a stale entry
    return s._cdata


class LiveBytes(TorchDispatchMode):
    """Counts the storages ops allocate while they are alive: `live_bytes` now, `peak_bytes` the
    most at once since the last `reset_peak()`. Storages that exist before (parameters, the
    batch) are never counted: only op outputs that share no storage with the op's inputs."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}  # key -> bytes of each live storage allocated under the mode
        self.refs: dict[int, weakref.ref] = {}  # key -> its weakref, whose callback counts the free
        self.live_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.observe(out, tensors_in((args, kwargs)))
        return out

    def observe(self, out, inputs, fresh: bool | None = None) -> None:
        """Count the storages among `out` that none of the `inputs` tensors shares (fresh=True:
        all are new, False: none is). Also called by autorank.cost.fastmeta.FastMeta for its
        observers, in place of a dispatch mode of our own."""
        if fresh is False:
            return
        keys = None
        for t in (out,) if isinstance(out, torch.Tensor) else tensors_in(out):
            s = t.untyped_storage()
            k = _key(s)
            if not fresh:
                if keys is None:
                    keys = {_key(a.untyped_storage()) for a in inputs}
                if k in keys:
                    continue
            if s.nbytes() == 0:
                continue
            old = self.sizes.get(k)
            if old is None:
                self.refs[k] = weakref.ref(s, functools.partial(self._free, k))
            self.sizes[k] = s.nbytes()
            self.live_bytes += s.nbytes() - (old or 0)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, k: int, ref=None) -> None:
        self.refs.pop(k, None)
        self.live_bytes -= self.sizes.pop(k, 0)

    def forget(self, t: torch.Tensor) -> None:
        """Stop counting t's storage (it stands for one that exists before, e.g. the labels)."""
        self.live_bytes -= self.sizes.pop(_key(t.untyped_storage()), 0)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


@dataclasses.dataclass
class LivePeak:
    """Peak live bytes of one measured training step, everything resident included.
    resident_bytes: alive when the step starts (parameters, buffers, optimizer and layer state,
    the batch); forward/backward/step_peak_bytes: the most alive at once in each phase (step:
    optimizer.step and zero_grad)."""

    resident_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    step_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.forward_peak_bytes, self.backward_peak_bytes, self.step_peak_bytes)


def make_optimizer(params, optimizer: str = "sgd", momentum: float = 0.9, lr: float = 1e-3):
    """torch's optimizer by name, with its default implementation (on the CPU a loop over the
    parameters, on CUDA the foreach one)."""
    opt = optimizer.lower()
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if opt in ("adam", "adamw"):
        return (torch.optim.Adam if opt == "adam" else torch.optim.AdamW)(params, lr=lr)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {list(OPTIMIZERS)}")


def _storage_bytes(tensors) -> int:
    sizes = {_key(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())


def measure_peak_training(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                          momentum: float = 0.9, lr: float = 1e-3, loss: str = "class") -> LivePeak:
    """Live bytes of one training step of a copy of `model` (as it is: apply a plan first):
    cross-entropy forward (`loss`: "class" or "token", autorank.cost.loss), backward,
    optimizer.step(), zero_grad(set_to_none=True).

    A warm-up step runs first, under the same mode, so that what it leaves (optimizer state, ASI
    warm-start factors) is counted as resident. `model` itself is not changed."""
    check_loss(loss)
    model = copy.deepcopy(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, momentum, lr)
    before = _storage_bytes(itertools.chain(model.parameters(), model.buffers(), (x, y)))
    live = LiveBytes()
    phases = []

    def step():
        live.reset_peak()
        value = training_loss(model(x), y, loss)
        phases.append(live.peak_bytes)
        live.reset_peak()
        value.backward()
        del value
        phases.append(live.peak_bytes)
        live.reset_peak()
        opt.step()
        opt.zero_grad(set_to_none=True)
        phases.append(live.peak_bytes)

    with live:
        step()  # warm-up
        # Adam's `step` counters are made by torch.tensor(), which no dispatch mode sees
        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        before += _storage_bytes(t for t in state if _key(t.untyped_storage()) not in live.sizes)
        resident = before + live.live_bytes
        phases.clear()
        step()
    fwd, bwd, stp = (before + p for p in phases)
    return LivePeak(resident, fwd, bwd, stp)


def measure_peak_training_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                                momentum: float = 0.9, lr: float = 1e-3, loss: str = "class") -> int:
    """Peak live tensor bytes of one training step (see measure_peak_training)."""
    return measure_peak_training(model, x, y, optimizer, momentum, lr, loss).peak_bytes
