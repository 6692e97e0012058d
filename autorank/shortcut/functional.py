"""Autograd Functions shared by the ASI / HOSVD layers and the lean companions.

The shortcut backward (DESIGN section 2): grad_weight from the Tucker core S and factors U_n of
the input, never rebuilding the input; grad_input and grad_bias exact. ASI and HOSVD differ only
in how they factorise (``layer.factorizer``), so they share every line here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .tucker import mode_product

_conv_bw = torch.ops.aten.convolution_backward.default


def _pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of the input, as nn.Conv2d pads it ('same' puts the odd
    pixel on the right / bottom). torch keeps these in a private attribute; computed here."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        (top, bottom), (left, right) = (
            (t // 2, t - t // 2) for t in (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)))
        return left, right, top, bottom
    ph, pw = (int(p) for p in conv.padding)
    return pw, pw, ph, ph


class ConvGeometry:
    """Stride, padding (as explicit F.pad amounts), dilation and groups of an nn.Conv2d.

    Symmetric zero padding goes straight to the native kernels; asymmetric zero padding ('same'
    with an even kernel) and non-zero padding modes pad the (small) backward operand explicitly
    and run the kernels with padding 0, so every configuration takes one code path per case.
    """

    def __init__(self, conv: nn.Conv2d):
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding = conv.padding  # int tuple or 'same' / 'valid', for the forward
        self.mode = conv.padding_mode
        left, right, top, bottom = _pads(conv)
        self.pads = (left, right, top, bottom)  # F.pad order
        self.native = self.mode == "zeros" and left == right and top == bottom
        self.native_padding = (top, left) if self.native else (0, 0)

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.mode != "zeros":
            x = F.pad(x, self.pads, mode=self.mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _pad(self, z: torch.Tensor) -> torch.Tensor:
        return F.pad(z, self.pads, mode="constant" if self.mode == "zeros" else self.mode)

    def grad_input(self, gy: torch.Tensor, w: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        h, wd = x_shape[2:]
        if self.native:
            return self._transpose(gy, w, (h, wd), self.native_padding)
        l, r, t, bt = self.pads
        gxp = self._transpose(gy, w, (h + t + bt, wd + l + r), (0, 0))
        if self.mode == "zeros":
            return gxp[:, :, t : t + h, l : l + wd]
        # reflect / replicate / circular: the pad's vector-Jacobian product does not depend on
        # the values of x, so take it on a zero tensor of x's shape (transient, nothing saved).
        with torch.enable_grad():
            z = torch.zeros(x_shape, dtype=gy.dtype, device=gy.device, requires_grad=True)
            (gx,) = torch.autograd.grad(F.pad(z, self.pads, mode=self.mode), z, gxp)
        return gx

    def _transpose(self, gy, w, size, padding) -> torch.Tensor:
        """grad_input of the conv as its transpose, sized to the input's (h, w). Not
        convolution_backward with an expanded dummy input: oneDNN copies that dummy into a
        full-size input in the default layout and returns the gradient in it, 3-12x slower than
        this on channels-last steps (docs/BENCHMARKS.md section 15); this allocates only gx."""
        k = w.shape[2:]
        out_pad = [size[i] - ((gy.shape[2 + i] - 1) * self.stride[i] - 2 * padding[i]
                              + self.dilation[i] * (k[i] - 1) + 1) for i in range(2)]
        return F.conv_transpose2d(gy, w, None, self.stride, padding, out_pad, self.groups, self.dilation)

    def grad_weight(self, z: torch.Tensor, w_shape, gy: torch.Tensor, groups: int) -> torch.Tensor:
        """Weight gradient of a conv of input z (unpadded) against output gradient gy."""
        padding = self.native_padding
        if not self.native:
            z = self._pad(z)
        if gy.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous(memory_format=torch.channels_last):
            # z (the Tucker core expanded) keeps the input's layout (tucker.mode_product), but a
            # padded z, or a core from a default-layout input, does not; beside a channels-last
            # gy torch's CPU convolution backward takes a slow path: 10-14x on 56x56 layers
            # (docs/BENCHMARKS.md section 13). Same numbers.
            z = z.contiguous(memory_format=torch.channels_last)
        dummy = gy.new_empty(1).expand(w_shape)
        return _conv_bw(gy, z, dummy, None, self.stride, padding, self.dilation,
                        False, [0, 0], groups, (False, True, False))[1]


def conv_weight_grad(core, factors, gy, w_shape, geom: ConvGeometry) -> torch.Tensor:
    """grad_weight of a conv whose input is the Tucker tensor (core, factors), from gy (B,O,H',W')."""
    u0, u1, u2, u3 = factors
    g = gy if u0 is None else mode_product(gy, u0, 0)  # (r0, O, H', W'): batch contracted
    z = core
    if u3 is not None:
        z = mode_product(z, u3.t(), 3)
    if u2 is not None:
        z = mode_product(z, u2.t(), 2)  # (r0, r1, H, W): core expanded along H, W
    groups = geom.groups
    if u1 is None:
        return geom.grad_weight(z, w_shape, g, groups)
    o, cg, kh, kw = w_shape
    c, r1 = u1.shape
    k_out = kh * kw * g.shape[2] * g.shape[3]
    # Path A: correlate over the r1 core channels (groups=1), then apply U1 per group.
    # Path B: expand channels back to C first, then the grouped correlation (cheap for depthwise).
    cost_a = r1 * o * k_out
    cost_b = c * r1 * z.shape[2] * z.shape[3] + o * cg * k_out
    if groups == 1 or cost_a <= cost_b:
        d = geom.grad_weight(z, (o, r1, kh, kw), g, 1)  # (O, r1, kh, kw)
        if groups == 1:
            return torch.matmul(u1, d.reshape(o, r1, kh * kw)).reshape(w_shape)
        og = o // groups
        gw = torch.matmul(u1.reshape(groups, 1, cg, r1), d.reshape(groups, og, r1, kh * kw))
        return gw.reshape(w_shape)  # (g, O/g, C/g, K) -> (O, C/g, kh, kw)
    return geom.grad_weight(mode_product(z, u1.t(), 1), w_shape, g, groups)


def linear_weight_grad(core, factors, gy) -> torch.Tensor:
    """grad_weight (out, in) of a linear layer whose input is the Tucker tensor (core, factors)."""
    g = gy
    for n, u in enumerate(factors[:-1]):
        if u is not None:
            g = mode_product(g, u, n)  # leading modes contracted: (r0, ..., r_{m-1}, out)
    r_last = core.shape[-1]
    gw = g.reshape(-1, g.shape[-1]).t() @ core.reshape(-1, r_last)  # (out, r_last)
    u = factors[-1]
    return gw if u is None else gw @ u.t()


def _pack_factors(factors):
    mask = tuple(u is not None for u in factors)
    return mask, [u for u in factors if u is not None]


def _unpack_factors(mask, stored):
    it = iter(stored)
    return [next(it) if m else None for m in mask]


def _save_compressed(ctx, x, weight, bias, layer) -> None:
    """Factorise x with the layer's factorizer and save (weight, core, stored factors): the only
    tensors a shortcut layer keeps for backward."""
    core, factors = layer.factorizer(x)
    ctx.has_bias = bias is not None
    ctx.mask, stored = _pack_factors(factors)
    ctx.save_for_backward(weight, core, *stored)


def _load_compressed(ctx):
    """(weight, core, factors) saved by _save_compressed."""
    weight, core, *stored = ctx.saved_tensors
    return weight, core, _unpack_factors(ctx.mask, stored)


class ShortcutConv2dFn(torch.autograd.Function):
    """y = conv(x); saves the Tucker core and factors of x (from ``layer.factorizer``) + weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        geom = layer.geometry
        y = geom.conv(x, weight, bias)
        ctx.geom, ctx.x_shape = geom, x.shape
        _save_compressed(ctx, x, weight, bias, layer)
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, core, factors = _load_compressed(ctx)
        geom = ctx.geom
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = geom.grad_input(gy, weight, ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = conv_weight_grad(core, factors, gy, weight.shape, geom)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


class ShortcutLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        y = F.linear(x, weight, bias)
        _save_compressed(ctx, x, weight, bias, layer)
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, core, factors = _load_compressed(ctx)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy @ weight
        if ctx.needs_input_grad[1]:
            gw = linear_weight_grad(core, factors, gy)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, gb, None


class FrozenConv2dFn(torch.autograd.Function):
    """y = conv(x) with grad_input (and grad_bias) only: saves no activation, only the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, geom):
        ctx.geom, ctx.x_shape, ctx.has_bias = geom, x.shape, bias is not None
        ctx.save_for_backward(weight)
        return geom.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = ctx.geom.grad_input(gy, weight, ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, None, gb, None


class FrozenLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, gb


def tucker_saved_numel(shape, ranks) -> int:
    """numel(core) + sum numel(U_n) over the compressed modes (rank < size)."""
    ranks = [min(int(r), int(s)) for r, s in zip(ranks, shape)]
    return math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks) if r < s)
