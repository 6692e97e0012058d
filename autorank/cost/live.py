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
fragmentation. `autorank-bench peak --device cpu|cuda` shows the size of that gap.
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


def cpu_kernel_scratch_bytes(func, args, out) -> int:
    """Bytes a CPU convolution holds inside its op beyond its outputs (0 for every other op).

    oneDNN computes in its blocked layout: each convolution copies its operands into that layout
    and its result back, so while the op runs it holds more than its inputs and outputs. From the
    CPU allocator's events (allocator_peak_bytes; x86, torch 2.13-2.14), per op, beyond the outputs
    that stay:
    - forward: a copy of the input, then the result in the blocked layout beside the final one:
      max(input, output);
    - backward, the input's gradient: the output's gradient copied, then the result in the
      blocked layout and, for a strided convolution, one more plain copy: max(grad_output, input),
      max(grad_output, 2 x input) when strided;
    - backward, the weight's gradient (a plainly trained convolution): the output's gradient and
      the input copied while the input's gradient is already made: grad_output + input.
    Storage sizes of dense tensors, as LiveBytes counts them."""
    if func is _CONV:
        return max(args[0].untyped_storage().nbytes(), out.untyped_storage().nbytes())
    if func is not _CONV_BACKWARD:
        return 0
    grad_output, x, mask = args[0], args[1], args[10]
    go, xb = grad_output.untyped_storage().nbytes(), x.untyped_storage().nbytes()
    strided = any(v > 1 for v in args[4])
    return max(max(go, (2 if strided else 1) * xb) if mask[0] else 0, go + xb if mask[1] else 0)


_CONV = torch.ops.aten.convolution.default
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default


class LiveBytes(TorchDispatchMode):
    """Counts the storages ops allocate while they are alive: `live_bytes` now, `peak_bytes` the
    most at once since the last `reset_peak()`. Storages that exist before (parameters, the
    batch) are never counted: only op outputs that share no storage with the op's inputs.

    scratch: a rule (func, args, out) -> bytes an op's kernel holds inside the op beyond its outputs
    (cpu_kernel_scratch_bytes); `kernel_peak_bytes` is then the most alive at once with that
    scratch counted while its op runs (its outputs are alive too: counted from after the op)."""

    def __init__(self, scratch=None):
        super().__init__()
        self.sizes: dict[int, int] = {}  # key -> bytes of each live storage allocated under the mode
        self.refs: dict[int, weakref.ref] = {}  # key -> its weakref, whose callback counts the free
        self.live_bytes = 0
        self.peak_bytes = 0
        self.scratch = scratch
        self.kernel_peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.observe(out, tensors_in((args, kwargs)), None, func, args)
        return out

    def observe(self, out, inputs, fresh: bool | None = None, func=None, args=()) -> None:
        """Count the storages among `out` that none of the `inputs` tensors shares (fresh=True:
        all are new, False: none is). Also called by autorank.cost.fastmeta.FastMeta for its
        observers, in place of a dispatch mode of our own. func, args: the op, for `scratch`."""
        self._count(out, inputs, fresh)
        scratch = self.scratch(func, args, out) if self.scratch is not None and func is not None else 0
        self.kernel_peak_bytes = max(self.kernel_peak_bytes, self.live_bytes + scratch)

    def _count(self, out, inputs, fresh: bool | None) -> None:
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
        self.peak_bytes = self.kernel_peak_bytes = self.live_bytes


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


def allocator_peak_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str = "sgd",
                         loss: str = "class") -> int:
    """Peak of the CPU allocator's bytes over one training step of a copy of `model` (after a
    warm-up), above what was allocated before it: every allocation a kernel makes, its scratch
    included, which LiveBytes cannot see. The reference for cpu_kernel_scratch_bytes. The
    allocation events are read from the profiler's event tree (torch.profiler keeps no public
    per-allocation timeline; `export_memory_timeline` is deprecated)."""
    from torch._C._profiler import _EventType  # private: the event kinds of the tree below

    model = copy.deepcopy(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)

    def step():
        training_loss(model(x), y, loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak
