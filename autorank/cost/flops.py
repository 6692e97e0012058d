"""FLOPs of one training step: torch.utils.flop_counter with the formulas it gets wrong fixed.

FlopCounterMode counts multiply-adds as 2 FLOPs for matmuls and convolutions and ignores
elementwise work (BN, activations, adds). Two faults are fixed here through its custom mapping:
- convolution_backward: the stock formula transposes the weight shape and so counts a grouped
  conv's backward `groups` times too high (960x for a 960-channel depthwise conv). Each of
  grad_input and grad_weight costs exactly what the forward does: 2 * B * prod(out spatial) *
  numel(weight).
- linalg_qr, SVD and eigh count 0 in the stock table; the compression ops of ASI/HOSVD are mostly
  these. Each method brings the formulas of its own ops (autorank.methods: `flop_formulas`;
  ASI the QR family in methods/asi.py, HOSVD the SVDs in methods/hosvd.py). Formulas (Golub & Van Loan, Matrix Computations, 4th ed., 5.2 and 8.6), k = min(m, n),
  M = max(m, n):
    QR (Householder), R only:           2 M k^2 - 2 k^3 / 3
    QR with the thin Q formed too:      twice that (geqrf + orgqr; torch.geqrf and
                                        linalg.householder_product are counted apart, the
                                        latter as LAPACK's 4mnk - 2(m+n)k^2 + 4k^3/3)
    SVD (R-SVD): values only 2 M k^2 + 2 k^3; thin U, V: 6 M k^2 + 20 k^3; full U, V: 4 M^2 k + 22 k^3
    eigh (symmetric QR): values only 4 n^3 / 3; with vectors 9 n^3
  Batched inputs multiply by the batch size.
- The CPU's fused attention kernel (_scaled_dot_product_flash_attention_for_cpu) and its backward
  count 0 in the stock table: torch's formulas for the CUDA attention kernels are used for them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

# The TorchDispatchMode inside FlopCounterMode, without its per-module bookkeeping: torch has no
# public way to count without module hooks (see _TotalCounter; the meta-path test compares the
# total with the public FlopCounterMode's, so a change in torch fails there, not silently).
from torch.utils.flop_counter import _FlopCounterMode

from autorank.cost.loss import logits_of
from autorank.cost.meta import run_planned
from autorank.methods import flop_formulas
from autorank.methods.asi import householder_product_flops, qr_flops  # noqa: F401  (re-exported)
from autorank.methods.hosvd import eigh_flops, svd_flops  # noqa: F401  (re-exported)
from autorank.shortcut import ASIFactorizer, TuckerLayer

aten = torch.ops.aten


def conv_forward_flops(x_shape, w_shape, out_shape, transposed: bool = False) -> int:
    """2 * B * prod(spatial) * numel(weight): numel(weight) = C_out * C_in/groups * kernel, so
    groups are already in the weight's shape."""
    spatial = (x_shape if transposed else out_shape)[2:]
    return 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    fwd = conv_forward_flops(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _attention_shapes(query_shape, key_shape, value_shape) -> tuple[int, int, int, int, int]:
    """(B * query heads, query length, key length, d_q, d_v); grouped-query keys (fewer heads,
    enable_gqa) are broadcast to the query heads, so the query's heads count."""
    *bh, s_q, d_q = query_shape
    return math.prod(bh), s_q, key_shape[-2], d_q, value_shape[-1]


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash kernel, which the stock table leaves out: q k^T and (.) v, 2 FLOPs per
    multiply-add (causal masking not discounted, as torch's formulas for the CUDA kernels)."""
    bh, s_q, s_k, d_q, d_v = _attention_shapes(query_shape, key_shape, value_shape)
    return 2 * bh * s_q * s_k * (d_q + d_v)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                       **kwargs) -> int:
    """Its backward: the scores recomputed (d_q), grad_out v^T and scores^T grad_out (d_v each),
    grad_scores^T q and grad_scores k (d_q each): torch's formula for the CUDA kernels."""
    bh, s_q, s_k, d_q, d_v = _attention_shapes(query_shape, key_shape, value_shape)
    return 2 * bh * s_q * s_k * (3 * d_q + 2 * d_v)


# the general corrections, then each method's own (autorank.methods: ASI's QR, HOSVD's SVDs)
CUSTOM_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten.convolution_backward: _conv_backward,
    **flop_formulas(),
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with the corrected formulas (display off)."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)


class _TotalCounter:
    """What torch's _FlopCounterMode needs of a FlopCounterMode, keeping the total only: the
    same ops counted by the same formulas, without FlopCounterMode's per-module bookkeeping
    (module hooks and backward hooks on every module: a third of a meta trace)."""

    def __init__(self):
        self.flop_registry = flop_counter().flop_registry
        self.total = 0

    def _count_flops(self, func_packet, out, args, kwargs):
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _count(model: nn.Module, example_input: torch.Tensor, lean: bool = False) -> int:
    devices = [example_input.device.index or 0] if example_input.is_cuda else []
    if lean:
        counter = _TotalCounter()
        mode = _FlopCounterMode(counter)
    else:
        counter = mode = flop_counter()
    with torch.random.fork_rng(devices=devices), mode:
        out = logits_of(model(example_input))
        if out.requires_grad:
            out.float().sum().backward()
    return int(counter.total if lean else counter.get_total_flops())


def train_step_flops(model: nn.Module, example_input: torch.Tensor, plan=None) -> int:
    """FLOPs of one forward + backward (loss = output.sum(): the loss itself is elementwise and
    counts 0). plan=None: the model as it is; a plan: applied to a copy. The optimizer update is
    elementwise and not counted. The model itself is never changed (ASI warm-start state).

    Counted on a meta-device shadow of the model (FlopCounterMode reads shapes only; torch.geqrf,
    which has no meta kernel, gets shape-only outputs: autorank.cost.fastmeta.FastMeta); a model that needs values
    (HOSVD_eps ranks) or fails on meta is counted on a real deep copy."""
    def count(m: nn.Module, x: torch.Tensor) -> int:
        with _warm_steps(m):
            return _count(m, x, lean=x.is_meta)

    return run_planned(model, plan, example_input, count)


@contextlib.contextmanager
def _warm_steps(model: nn.Module):
    """Count a steady-state step: an ASI layer's first step after a (re)start runs extra
    subspace iterations (autorank.shortcut ASIFactorizer.cold_start_iters), a one-off that is not
    the per-step cost."""
    saved = []
    for m in model.modules():
        if isinstance(m, TuckerLayer) and isinstance(m.factorizer, ASIFactorizer):
            f = m.factorizer
            saved.append((f, f.cold_start_iters))
            f.cold_start_iters = 0
    try:
        yield
    finally:
        for f, n in saved:
            f.cold_start_iters = n
