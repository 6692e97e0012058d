"""Lean companions inside a language model's trained region: the SwiGLU MLP.

A Llama-style MLP computes down_proj(silu(gate_proj(x)) * up_proj(x)). Plain autograd keeps three
(B, L, I) tensors for its backward: gate(x) (SiLU's input), silu(gate(x)) and up(x) (the product's
operands). `swiglu` computes the same product keeping gate(x) and up(x) only and recomputes silu
in the backward: two. `LeanSwiGLU` is the MLP with its product computed so; it keeps the MLP's
submodules under their own names, so `...mlp.gate_proj` still names the gate projection, whatever
a plan made of it (plain, ASI, LoRA, a frozen companion).

No lean RMSNorm: Hugging Face's LlamaRMSNorm with its weight frozen (as inside a trained region)
already keeps only its input and rstd in float32 (`x.to(torch.float32)` is x itself, and
`weight * normed` keeps the weight alone), which is all a custom Function would keep
(tests/test_lean_llm.py measures it).

torch only: the MLP is recognised by its structure, never by importing `transformers`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .base import ShortcutLayer

__all__ = ["LeanSwiGLU", "is_silu", "swiglu"]

_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in place on silu's fresh output: one (B, L, I) less at once

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = (gate * s).mul_(gy)  # silu(gate), recomputed
        if ctx.needs_input_grad[0]:
            # silu'(gate) = s * (1 + gate * (1 - s)): torch's own silu_backward formula
            g_gate = torch.rsub(s, 1).mul_(gate).add_(1).mul_(s).mul_(gy).mul_(up)
        return g_gate, g_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the same values and gradients as the plain expression. When gate needs a
    gradient, autograd keeps gate and up (silu(gate) is recomputed in the backward); otherwise it
    is the plain expression. A torch function (torch.overrides): a TorchFunctionMode sees one call,
    as it sees F.linear (the cost model's tracer has a rule for it: autorank.cost.seqrules)."""
    if has_torch_function_variadic(gate, up):
        return handle_torch_function(swiglu, (gate, up), gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu takes gate and up of one shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if torch.is_grad_enabled() and gate.requires_grad:
        return _SwiGLUFn.apply(gate, up)
    return F.silu(gate) * up


def is_silu(module: nn.Module) -> bool:
    """nn.SiLU, or transformers' SiLUActivation (F.silu; matched by name: no transformers import)."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


class LeanSwiGLU(ShortcutLayer):
    """A SwiGLU MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn SiLU, whose product
    keeps gate(x) and up(x) for the backward, not silu(gate(x)) too (`swiglu`).

    Unlike the other companions it holds the MLP's submodules as its own, under their names
    (`keeps_children`): plan names resolve through it, and the projections are traced like any
    module (`traced`). The original MLP is `base_layer`, deliberately not registered: its
    submodules are these, and registering both would list every weight twice in the state dict.
    Only an MLP whose forward is exactly that expression may be wrapped (the plan matches known
    classes by name: autorank.plan.apply)."""

    traced = True
    keeps_children = True

    def __init__(self, base: nn.Module):
        missing = [p for p in _PARTS if not isinstance(getattr(base, p, None), nn.Module)]
        if missing:
            raise TypeError(f"LeanSwiGLU wraps an MLP with gate_proj, up_proj, down_proj and act_fn; "
                            f"{type(base).__name__} lacks {', '.join(missing)}")
        if not is_silu(base.act_fn):
            raise TypeError(f"LeanSwiGLU needs a SiLU act_fn, got {type(base.act_fn).__name__}")
        nn.Module.__init__(self)  # not ShortcutLayer.__init__: base_layer stays unregistered
        object.__setattr__(self, "base_layer", base)
        for name in _PARTS:
            setattr(self, name, getattr(base, name))
        self.training = base.training  # its own flag only: the submodules keep theirs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def train(self, mode: bool = True) -> "LeanSwiGLU":
        super().train(mode)
        self.base_layer.training = mode  # the original comes back (remove_plan) in the model's mode
        return self

    def saved_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """The product's part: gate(x) and up(x), (..., I) each; the projections (traced) add
        their own."""
        rows = math.prod(int(s) for s in input_shape[:-1])
        intermediate = int(self.gate_proj.weight.shape[0])
        return 2 * rows * intermediate * torch.empty((), dtype=dtype).element_size()
