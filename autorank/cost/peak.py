"""Peak memory of one training step, predicted from the parts that hold memory.

    total = weights + grads + optimizer + activations + batch + state + transient

- weights: every parameter and buffer (all resident, trained or not).
- grads: one gradient per trained parameter (requires_grad), its size.
- optimizer: SGD with momentum keeps one buffer per trained parameter (none without momentum);
  Adam/AdamW keep two, and a float32 step counter.
- activations: predict_saved_bytes (every saved tensor, storages counted once).
- batch: the input (unless it is itself saved, then it is in activations already) and the int64
  labels, one per output position.
- state: ASI warm-start factors held between steps (layer.state_bytes; the simulated step
  starts with them alive, as a real step after the first does).
- transient: how far the step's peak rises above the parts above (never below 0).

The peak comes from simulating the step on the meta-device shadow: the forward with autograd on
(the same trace that predicts the saved bytes), the cross-entropy loss and the backward, with
autorank.cost.live.LiveBytes counting every storage while it lives, as it counts a real step
(measure_peak_training). So the forward through a frozen prefix (no graph, but each op's input
and output coexist, a residual block holds its input for the skip, BN outputs are new storages),
the outputs alive in the trained region, a shortcut layer's factorisation temporaries, and in the
backward the gradients beside the saved tensors not yet freed are counted as they happen. The
optimizer step is added from its parts (_step_temporaries). forward/backward/step_peak_bytes are
the three phases' peaks, everything resident included; total_bytes is the largest of them, or
the sum of the parts when that is larger (the gradients and all saved activations rarely coexist;
the sum stays on the safe side, within a few percent).

Not in total_bytes: memory a kernel allocates and frees inside one op, which is no tensor. On the
CPU the backward of a plainly trained convolution copies its input and its output's gradient
once more (oneDNN's reorders; autorank.cost.live.cpu_kernel_scratch_bytes); the simulated step
counts that copy while the op runs, beside what is alive then, and `kernel_bytes` is how far
that raises the step's peak above total_bytes (0 when it stays below), which the process model
(autorank.cost.process) adds. Not
modelled: cuDNN's workspace on a GPU, which can exceed the tensors.
`autorank-bench peak --device cpu` compares this with the live bytes of a real CPU step (--allocator: with
the CPU allocator's peak), `autorank-bench peak --device cuda` with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn

from autorank.cost.fastmeta import active_fast_meta
from autorank.cost.live import LiveBytes, cpu_kernel_scratch_bytes
from autorank.cost.loss import check_loss, label_shape, logits_of, training_loss
from autorank.cost.meta import run_planned, storage_key
from autorank.cost.saved import trace_training_forward
from autorank.shortcut import ASIFactorizer, TuckerLayer

OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}


@dataclasses.dataclass
class PeakMemory:
    """The parts of the peak (module doc); total_bytes is their sum. forward/backward/step_peak_bytes:
    each phase's simulated peak, everything resident included (compare LivePeak's)."""

    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    batch_bytes: int
    transient_bytes: int
    state_bytes: int
    total_bytes: int
    forward_peak_bytes: int = 0
    backward_peak_bytes: int = 0
    step_peak_bytes: int = 0
    kernel_bytes: int = 0

    @property
    def training_bytes(self) -> int:
        """What the step holds at its peak in a real process: the tensors and the kernel copy."""
        return self.total_bytes + self.kernel_bytes

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 2**20


def predict_peak_training_bytes(model: nn.Module, example_input: torch.Tensor, plan=None,
                                optimizer: str = "sgd", momentum: float = 0.9, loss: str = "class") -> PeakMemory:
    """Predicted peak memory of one training step of `model` (with `plan` applied to a copy, or
    as it is when plan=None) on a batch shaped like `example_input`: forward, cross-entropy
    (`loss`: "class", or "token" for a language model's (B, L, V) logits: autorank.cost.loss),
    backward, optimizer.step(), zero_grad(set_to_none=True). Runs on a meta-device shadow of the
    model (see predict_saved_bytes)."""
    opt = optimizer.lower()
    if opt not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATES)}")
    check_loss(loss)
    return run_planned(model, plan, example_input,
                       lambda m, x: _peak(m, x, example_input.is_cuda, opt, momentum, loss))


def _simulate_step(model: nn.Module, x: torch.Tensor, cuda: bool, loss_kind: str = "class"):
    """Forward (traced for the saved bytes), loss and backward of `model` on x under LiveBytes.
    Returns (saved-bytes prediction, label shape, forward peak, backward peak, state, kernel
    peak), the peaks in live bytes of the storages the step allocates (what existed before it is
    not counted) plus the warm-start state held from the step before (`state`, also returned);
    kernel peak: the forward's and backward's with the CPU kernels' scratch counted (0 on CUDA)."""
    live = LiveBytes(scratch=None if cuda else cpu_kernel_scratch_bytes)
    # each simulation runs on a copy of the layer's factorizer (it leaves no state behind), and
    # simulates a steady-state step: no extra cold-start iterations (same peak, less time)
    tucker = [m for m in model.modules() if isinstance(m, TuckerLayer)]
    factorizers = [m.factorizer for m in tucker]
    for m in tucker:
        m.factorizer = copy.deepcopy(m.factorizer)
        if isinstance(m.factorizer, ASIFactorizer):
            m.factorizer.cold_start_iters = 0
    fast = active_fast_meta()  # on a meta shadow: count through its mode, not one more
    try:
        with fast.observing(live) if fast is not None else live:
            state = _warm_up(model, x, tucker, live)
            saved, out = trace_training_forward(model, x, cuda)
            logits = logits_of(out)
            labels = torch.zeros(label_shape(logits.shape, loss_kind), dtype=torch.int64, device=logits.device)
            live.forget(labels)  # the batch's labels: resident, in batch_bytes
            loss = training_loss(logits, labels, loss_kind)
            del out, logits
            forward, kernel = live.peak_bytes, live.kernel_peak_bytes
            live.reset_peak()
            if loss.requires_grad:
                loss.backward()
            del loss
            backward, kernel = live.peak_bytes, max(kernel, live.kernel_peak_bytes)
    finally:
        for m, f in zip(tucker, factorizers):
            m.factorizer = f
    return saved, tuple(labels.shape), forward, backward, state, (0 if cuda else kernel)


def _warm_up(model: nn.Module, x: torch.Tensor, tucker: list, live: LiveBytes) -> int:
    """A step after the first holds the ASI factors of the step before, and replaces them layer
    by layer as its forward runs (the old ones freed as the new ones are made). One forward
    (graph dropped) leaves that state behind, counted live, so the simulated step replaces it as
    a real one does. Returns its bytes (0 without ASI layers: nothing runs)."""
    if not any(isinstance(m.factorizer, ASIFactorizer) for m in tucker):
        return 0
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        model(x)
    live.reset_peak()
    return live.live_bytes


def _step_temporaries(opt: str, trained: list[torch.Tensor], cuda: bool) -> int:
    """Bytes optimizer.step() allocates beyond its state (torch 2.14 defaults, measured): SGD
    updates in place; Adam/AdamW's denominator sqrt(v) / c + eps is a new tensor. On CUDA the
    foreach implementation builds it for all parameters at once (1 x the gradients); on the CPU
    the per-parameter loop holds two of one parameter's size (sqrt, then the division) while the
    previous parameter's denominator is still bound."""
    if opt == "sgd" or not trained:
        return 0
    sizes = [p.numel() * p.element_size() for p in trained]
    if cuda:
        return sum(sizes)
    return max(2 * s + prev for s, prev in zip(sizes, [0, *sizes]))


def _peak(model: nn.Module, example_input: torch.Tensor, cuda: bool, opt: str, momentum: float,
          loss: str = "class") -> PeakMemory:
    """The parts, from the planned model (real or meta: shapes only) and a simulated step on it."""
    storages = {storage_key(t): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    weights = sum(storages.values())
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    n_states = OPTIMIZER_STATES[opt] if (opt != "sgd" or momentum) else 0
    optimizer_bytes = n_states * grads
    if opt != "sgd":
        optimizer_bytes += 4 * len(trained)  # Adam's `step` counter: a float32 scalar per parameter

    saved, labels_shape, forward, backward, warm, kernel = _simulate_step(model, example_input, cuda, loss)
    modules = dict(model.named_modules())
    state = sum(int(modules[name].state_bytes(in_shape, dtype)) for name, in_shape, _, dtype in saved.region_shapes
                if isinstance(modules[name], TuckerLayer))
    x_bytes = example_input.numel() * example_input.element_size()
    labels = math.prod(labels_shape) * 8  # int64
    batch = labels if saved.input_saved else labels + x_bytes

    # resident when the step starts; the ASI state (`warm`, held from the step before and
    # replaced during the forward) is inside the simulated phases' live bytes
    resident = weights + optimizer_bytes + x_bytes + labels
    forward_peak = resident + forward
    backward_peak = resident + backward
    step_peak = resident + warm + grads + _step_temporaries(opt, trained, cuda)
    parts = weights + grads + optimizer_bytes + saved.activation_bytes + batch + state
    total = max(parts, forward_peak, backward_peak, step_peak)
    return PeakMemory(weights, grads, optimizer_bytes, saved.activation_bytes, batch, total - parts, state, total,
                      forward_peak, backward_peak, step_peak, kernel_bytes=max(0, resident + kernel - total))

