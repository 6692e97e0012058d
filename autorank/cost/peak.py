"""Peak memory of one training step, predicted from the parts that hold memory.

    total = weights + grads + optimizer + activations + batch + state + transient

- weights: every parameter and buffer (all resident, trained or not).
- grads: one gradient per trained parameter (requires_grad), its size.
- optimizer: SGD with momentum keeps one buffer per trained parameter (none without momentum);
  Adam/AdamW keep two.
- activations: predict_saved_bytes (every saved tensor, storages counted once).
- batch: the input (unless it is itself saved, then it is in activations already) and int64
  labels, one per sample.
- state: ASI warm-start factors held between steps (layer.state_bytes). Within a step the fp32
  factors are also the saved ones, so this double-counts sum(U_n): small, and on the safe side.
- transient: the largest set of short-lived tensors, an estimate, taken conservatively. During
  backward through a module, its output gradient and its input gradient coexist with the saved
  tensors, and a residual block holds one more output-sized gradient for the skip branch: so
  max over modules on the gradient path of (input + 2 x output) bytes; a shortcut (ASI/HOSVD)
  layer adds its input once more in the factorisation dtype (projection workspace). Plus the
  loss: logits' gradient, the saved log-softmax and the logits themselves (3 x output bytes).
  Not modelled: allocator rounding and fragmentation, cuDNN/oneDNN workspaces, the optimizer's
  foreach temporaries. scripts/check_peak_cuda.py compares this with
  torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from autorank.cost.meta import run_planned, storage_key
from autorank.cost.saved import trace_saved_bytes
from autorank.shortcut import TuckerLayer

OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}


@dataclasses.dataclass
class PeakMemory:
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    batch_bytes: int
    transient_bytes: int
    state_bytes: int
    total_bytes: int

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 2**20


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def predict_peak_training_bytes(model: nn.Module, example_input: torch.Tensor, plan=None,
                                optimizer: str = "sgd", momentum: float = 0.9) -> PeakMemory:
    """Predicted peak memory of one training step of `model` (with `plan` applied to a copy, or
    as it is when plan=None) on a batch shaped like `example_input`. Runs on a meta-device
    shadow of the model (see predict_saved_bytes)."""
    opt = optimizer.lower()
    if opt not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATES)}")
    return run_planned(model, plan, example_input,
                       lambda m, x: _peak(m, x, trace_saved_bytes(m, x, example_input.is_cuda), opt, momentum))


def _peak(model: nn.Module, example_input: torch.Tensor, saved, opt: str, momentum: float) -> PeakMemory:
    """The parts, from the planned model (real or meta: only shapes are read) and its trace."""
    storages = {storage_key(t): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    weights = sum(storages.values())
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    n_states = OPTIMIZER_STATES[opt] if (opt != "sgd" or momentum) else 0
    optimizer_bytes = n_states * grads

    batch = example_input.shape[0] * 8  # int64 labels
    if not saved.input_saved:
        batch += example_input.numel() * example_input.element_size()

    modules = dict(model.named_modules())
    state = 0
    transient = 0
    out_bytes = 0
    for name, in_shape, out_shape, dtype in saved.region_shapes:
        module = modules[name]
        e = _elem(dtype)
        in_b, o_b = math.prod(in_shape) * e, math.prod(out_shape) * e
        extra = 0
        if isinstance(module, TuckerLayer):
            state += int(module.state_bytes(in_shape, dtype))
            extra = math.prod(in_shape) * max(e, 4)
        transient = max(transient, in_b + 2 * o_b + extra)
        if name == "":
            out_bytes = o_b
    transient += 3 * out_bytes
    total = weights + grads + optimizer_bytes + saved.activation_bytes + batch + state + transient
    return PeakMemory(weights, grads, optimizer_bytes, saved.activation_bytes, batch, transient, state, total)
