"""Lean companions for the rest of a trained region (docs/ARCHITECTURE.md).

In a trained region with BN in eval mode, the trained convs' inputs are only 26-60% of what
backward keeps; BN inputs and ReLU/ReLU6 outputs hold most of the rest, and a frozen conv inside
the region still saves its input under plain autograd. Each companion here gives the same outputs
and gradients as the plain module while saving (almost) nothing:

- FrozenBatchNorm2d: y = x * scale + shift with eval statistics; saves nothing (backward
  recomputes the per-channel scale from the frozen buffers). The BN affine gets no gradient.
- PackedReLU: ReLU / ReLU6 / Hardtanh saving a 1-bit-per-element mask (ceil(numel/8) bytes).
- FrozenConv2d / FrozenLinear: grad_input (and grad_bias) only; saves the weight, no activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import BATCH_NORMS, ShortcutLayer
from .functional import ConvGeometry, FrozenConv2dFn, FrozenLinearFn
from .tucker import inverse_permutation, physical_order

__all__ = ["FrozenBatchNorm2d", "PackedReLU", "FrozenConv2d", "FrozenLinear", "pack_bits", "unpack_bits"]


def _shifts(device) -> torch.Tensor:
    # made per call (8 bytes), not cached per device: a module-level cache is memory that one
    # step allocates and later steps do not, which the cost model's step simulation cannot see
    return torch.arange(8, dtype=torch.uint8, device=device)


# Packs the 8 bytes (each 0 or 1) of an int64 word into its top byte, bit i = byte i: the word
# times this constant puts byte i's bit at 56 + i with no carries between the 8 sums (a known
# multiply trick). One elementwise pass over n/8 words instead of a shift per element and a
# reduction over 8: 2x faster packing measured at 128x48x56x56 on the CPU box.
_PACK_MUL = 0x0102040810204080


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 tensor of ceil(numel/8) bytes (bit i of byte k = element 8k+i)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    elif flat.storage_offset() % 8:  # a view into a larger mask: int64 words must be aligned
        flat = flat.clone()
    # bool and uint8 share the 1-byte layout; the product wraps in int64 (only its top byte is
    # kept); >> is arithmetic, so the conversion to uint8 keeps the low 8 bits of the shift
    # (shifted in place: one n-byte temporary, as many as the per-element shift it replaced)
    packed = flat.view(torch.uint8).view(torch.int64) * _PACK_MUL
    packed >>= 56
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_bits: uint8 (ceil(n/8),) -> bool tensor of the given shape."""
    n = math.prod(shape)
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:n].view(torch.bool).reshape(shape)


class _FrozenAffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn):
        ctx.bn = bn
        scale, shift = bn.scale_shift(x)
        return torch.addcmul(shift, x, scale)

    @staticmethod
    def backward(ctx, gy):
        scale, _ = ctx.bn.scale_shift(gy)
        return gy * scale, None


class FrozenBatchNorm2d(ShortcutLayer):
    """BatchNorm with its running statistics and affine frozen: y = x * scale + shift.

    Always uses the running statistics (eval behaviour, whatever the train flag); never updates
    them; the affine weight/bias get no gradient. Saves no activation.
    """

    def __init__(self, base: nn.Module):
        if not isinstance(base, BATCH_NORMS):
            raise TypeError(f"expected a BatchNorm module, got {type(base).__name__}")
        if base.running_mean is None or base.running_var is None:
            raise ValueError("FrozenBatchNorm2d needs running statistics (track_running_stats=True)")
        super().__init__(base)

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and shift, shaped (1, C, 1, ...) to broadcast against x."""
        bn = self.base_layer
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        return scale.to(x.dtype).view(view), shift.to(x.dtype).view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenAffineFn.apply(x, self)
        scale, shift = self.scale_shift(x)
        return torch.addcmul(shift, x, scale)

    @classmethod
    def saved_bytes(cls, input_shape, dtype=torch.float32) -> int:
        return 0


class _PackedClampFn(torch.autograd.Function):
    # A permuted x (channels-last: N, H, W, C) is packed in its memory order (tucker.physical_order):
    # flattening it in the logical order would copy the mask, and unpacking into the gradient's
    # layout keeps the product fast.
    @staticmethod
    def forward(ctx, x, lo, hi):
        y = x.clamp(lo, hi)
        mask = x > lo
        if hi is not None:
            mask &= x < hi
        ctx.order = physical_order(mask)
        if ctx.order is not None:
            mask = mask.permute(ctx.order)
        ctx.shape = mask.shape
        ctx.save_for_backward(pack_bits(mask))
        return y

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        if ctx.order is not None:
            mask = mask.permute(inverse_permutation(ctx.order))
        return gy * mask, None, None


class PackedReLU(ShortcutLayer):
    """ReLU / ReLU6 / Hardtanh whose backward keeps a bit-packed mask (1 bit per element)."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        if isinstance(base, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            self.lo, self.hi = float(base.min_val), float(base.max_val)
        elif isinstance(base, nn.ReLU):
            self.lo, self.hi = 0.0, None
        else:
            raise TypeError(f"PackedReLU wraps nn.ReLU, nn.ReLU6 or nn.Hardtanh, got {type(base).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedClampFn.apply(x, self.lo, self.hi)
        return self.base_layer(x)

    @classmethod
    def saved_bytes(cls, input_shape, dtype=torch.float32) -> int:
        return (math.prod(int(s) for s in input_shape) + 7) // 8

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}"


class FrozenConv2d(ShortcutLayer):
    """A frozen conv inside the trained region: exact grad_input, no activation saved.

    The weight never gets a gradient (frozen by definition); a bias that requires grad does.
    """

    def __init__(self, base: nn.Conv2d):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(base).__name__}")
        super().__init__(base)
        self.geometry = ConvGeometry(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer.bias
        if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
            return FrozenConv2dFn.apply(x, self.base_layer.weight, b, self.geometry)
        return self.base_layer(x)

    @classmethod
    def saved_bytes(cls, input_shape, dtype=torch.float32) -> int:
        return 0  # only the weight, a parameter


class FrozenLinear(ShortcutLayer):
    """A frozen linear layer inside the trained region: exact grad_input, no activation saved."""

    def __init__(self, base: nn.Linear):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(base).__name__}")
        super().__init__(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer.bias
        if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
            return FrozenLinearFn.apply(x, self.base_layer.weight, b)
        return self.base_layer(x)

    @classmethod
    def saved_bytes(cls, input_shape, dtype=torch.float32) -> int:
        return 0
