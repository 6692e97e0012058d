"""recompute: activation checkpointing of a block. In the forward the block keeps only its
inputs; the backward runs its forward again (with autograd on) and then its backward, so the
block's intermediate tensors live during its own backward only. Exact: the gradients are plain
training's; the price is one more forward of the block per step.

Plan: the block's module name with the choice `recompute`, beside the conv/linear choices
(`features.15: recompute`); the block's own layers keep their choices (full, ASI, ... inside a
recomputed block: recomputation + ASI). A segment of several blocks is their parent's name, or
each block named (each then keeps its own input). Search: a space's `recompute` option offers
blocks; each takes the key `recompute` or `frozen` (kept as it is); code `R`.

The layer: `Recompute(block)`, torch.utils.checkpoint with use_reentrant=False (the RNG state is
restored for the recomputation: dropout draws the same mask). It keeps the block's submodules
under their own names (plan names and the state dict see through it). BatchNorm in training mode
inside a recomputed block updates its running statistics twice per step (torch's own caveat);
autorank's plans freeze BN statistics (finetune_mode), where this does not arise.

Saved bytes: the block's tensor inputs (storages shared with other saved tensors counted once),
when the block needs a graph at all. FLOPs: nothing of its own: the recomputed forward runs op
by op in the backward and is counted there (train_step_flops): plain training's FLOPs plus the
block's forward up to its last op that saves a tensor, that op excluded (torch stops the
recomputation once the last saved tensor is back, and an op saves its inputs before it runs:
checkpoint's early stop, on by default; for a conv block, every conv but the last). Peak: the
cost model simulates the step, the recomputation included.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autorank.errors import PlanError
from autorank.methods.base import Choice, KeyInfo, Method, register_method
from autorank.shortcut.base import ShortcutLayer, elem_bytes


def _tensors(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


class Recompute(ShortcutLayer):
    """A block whose forward is recomputed in the backward (module doc). The block is
    `base_layer`, deliberately not registered: its submodules (and any parameter or buffer of
    its own) are registered here under their names, so the state dict keeps its keys."""

    keeps_children = True

    def __init__(self, block: nn.Module):
        nn.Module.__init__(self)  # not ShortcutLayer.__init__: base_layer stays unregistered
        object.__setattr__(self, "base_layer", block)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in block.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
        self.training = block.training

    def needs_graph(self, args) -> bool:
        """Whether the forward builds a graph: grad mode on and an input or a weight needs a gradient."""
        return torch.is_grad_enabled() and (any(t.requires_grad for t in _tensors(args))
                                            or any(p.requires_grad for p in self.base_layer.parameters()))

    def forward(self, *args, **kwargs):
        if not self.needs_graph(args):
            return self.base_layer(*args, **kwargs)
        return checkpoint(self.base_layer, *args, use_reentrant=False, **kwargs)

    def train(self, mode: bool = True) -> "Recompute":
        super().train(mode)
        self.base_layer.training = mode  # the original comes back (remove_plan) in the model's mode
        return self

    def saved_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """The block's input (one tensor of that shape): all the forward keeps."""
        return math.prod(int(s) for s in input_shape) * elem_bytes(dtype)


class RecomputeMethod(Method):
    name = "recompute"
    summary = "a block keeps only its inputs and runs its forward again in the backward (exact)"
    trains = False
    exact = True
    scope = "module"
    layer_types = (Recompute,)
    notation = "recompute (on a block)"

    def parse_key(self, key: str) -> KeyInfo | None:
        return KeyInfo(self.name) if key == self.name else None

    def key_choice(self, key, ranks) -> Choice:
        return Choice.recompute()

    def code(self, key: str) -> str:
        return "R"

    def check(self, module: nn.Module, choice: Choice, name: str) -> None:
        if not name or next(module.children(), None) is None:
            raise PlanError(f"plan entry {name!r}: recompute applies to a block (a module holding layers, "
                            f"e.g. features.3), not to {type(module).__name__}")
        clash = [n for n, _ in module.named_parameters(recurse=False) if hasattr(ShortcutLayer, n)]
        if clash:
            raise PlanError(f"plan entry {name!r}: cannot recompute a module with its own parameter "
                            f"{clash[0]!r}: name its parent or its children")

    def build(self, module: nn.Module, choice: Choice, name: str) -> nn.Module:
        return Recompute(module)

    def saved_rule(self, tracer, module: Recompute, args: tuple) -> None:
        for t in _tensors(args):  # kept by checkpoint for the recomputation, each storage once
            tracer.save(t)


RECOMPUTE_METHOD = register_method(RecomputeMethod())
