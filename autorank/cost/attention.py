"""Scaled-dot-product attention on the meta device as the CPU runs it.

F.scaled_dot_product_attention picks a kernel per device. On the CPU it is the fused flash
kernel (`_scaled_dot_product_flash_attention_for_cpu`, which saves q, k, v, its output and a
float32 log-sum-exp of shape (B, H, L)) whenever that kernel's checks pass (no dropout, 4-D
inputs, supported dtype, ...), else the math composite (matmul, softmax, matmul: it saves the
(L, L) attention weights). On the meta device torch always takes the math path, so a meta shadow
would simulate another step than the CPU runs. `CpuAttention` routes the meta call to the kernel
the CPU would pick, and `sdpa_backend` tells the saved-bytes rules which one that is.

The choice is torch's own (`torch._fused_sdp_choice`, the function F.scaled_dot_product_attention
calls; torch has no public name for it), asked on uninitialised CPU stand-ins with the meta
tensors' shapes, strides, dtypes and flags: its checks read only those. A CUDA step's kernels
(flash, memory-efficient, cuDNN) are not modelled here: a CUDA shadow keeps torch's meta path.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

__all__ = ["CpuAttention", "SdpaCall", "sdpa_backend", "sdpa_call"]

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """F.scaled_dot_product_attention's signature (a builtin: inspect cannot read it)."""


_SIG = inspect.signature(_sdpa_reference)


class SdpaCall:
    """The arguments of one F.scaled_dot_product_attention call, by name."""

    def __init__(self, args, kwargs):
        bound = _SIG.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        self.query, self.key, self.value = a["query"], a["key"], a["value"]
        self.attn_mask, self.dropout_p, self.is_causal = a["attn_mask"], float(a["dropout_p"]), bool(a["is_causal"])
        self.scale, self.enable_gqa = a["scale"], bool(a["enable_gqa"])

    def tensors(self):
        return [t for t in (self.query, self.key, self.value, self.attn_mask) if isinstance(t, torch.Tensor)]


def sdpa_call(args, kwargs) -> SdpaCall:
    return SdpaCall(args, kwargs or {})


def _desc(t):
    if not isinstance(t, torch.Tensor):
        return None
    return tuple(t.shape), t.stride(), t.dtype, t.requires_grad


@functools.lru_cache(maxsize=1024)
def _cpu_choice(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> int:
    def stand_in(d):
        if d is None:
            return None
        shape, stride, dtype, rg = d
        return torch.empty_strided(shape, stride, dtype=dtype).requires_grad_(rg and dtype.is_floating_point)

    return int(torch._fused_sdp_choice(stand_in(q), stand_in(k), stand_in(v), stand_in(mask), dropout_p,
                                       is_causal, scale=scale, enable_gqa=enable_gqa))


def sdpa_backend(call: SdpaCall) -> str:
    """'flash' or 'math': the kernel the CPU runs for this call (its tensors real or meta)."""
    choice = _cpu_choice(_desc(call.query), _desc(call.key), _desc(call.value), _desc(call.attn_mask),
                         call.dropout_p, call.is_causal, call.scale, call.enable_gqa)
    return "flash" if choice == SDPBackend.FLASH_ATTENTION.value else "math"


class CpuAttention(TorchFunctionMode):
    """Within: F.scaled_dot_product_attention on meta tensors runs the kernel the CPU would run
    (autograd records that kernel's node, so its backward is the CPU's too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = sdpa_call(args, kwargs)
            if all(t.is_meta for t in call.tensors()) and sdpa_backend(call) == "flash":
                return _FLASH_CPU(call.query, call.key, call.value, call.dropout_p, call.is_causal,
                                  attn_mask=call.attn_mask, scale=call.scale)[0]
        return func(*args, **kwargs)
