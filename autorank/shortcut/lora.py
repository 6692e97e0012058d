"""LoRA beside the frozen weight, and LoRA whose A matrix keeps its input in ASI form.

y = W x + b + scaling * B(A(x)), W and b frozen, A (rank x in) and B (out x rank) trained, B
starting at zero (the model is unchanged at step 0). A's weight gradient needs the layer's
input x: plain LoRA saves x whole, as full fine-tuning of W would; `lora_A` may be an
ASILinear instead, which saves a Tucker form of x (LoRA + ASI), while B's gradient
needs only A(x), rank wide.

Our own layer rather than peft's: peft injects adapters model-wide from one LoraConfig (one
rank, target-module patterns), keeps them in ModuleDicts keyed by adapter name and removes them
through PeftModel.unload(); a plan gives each layer its own choice (frozen, full, ASI, LoRA at a
rank, LoRA + ASI), swaps and restores layers itself, and must wrap A's own forward to compress
its input. The math is peft's LoRA (kaiming-uniform A, zero B, scaling = alpha / rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import ShortcutLayer, elem_bytes
from .layers import ASILinear

__all__ = ["LoRALinear"]


class LoRALinear(ShortcutLayer):
    """LoRA around an nn.Linear (`base_layer`, frozen by the plan); `asi_ranks`: lora_A is an
    ASILinear at these ranks (one per input mode). The start of A is drawn from `seed` with a
    private generator (the global RNG is not touched), so a plan applies the same way anywhere.

    The cost model traces its forward op by op (``traced = True``): A's input is the layer's input
    itself, a storage the q/k/v projections of one block share."""

    traced = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 asi_ranks: Sequence[int] | None = None, seed: int = 0):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(base).__name__}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        super().__init__(base)
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / self.rank
        w = base.weight
        a = nn.Linear(base.in_features, self.rank, bias=False, device=w.device, dtype=w.dtype)
        b = nn.Linear(self.rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and peft's
            with torch.no_grad():
                a.weight.copy_(torch.empty(a.weight.shape, dtype=w.dtype).uniform_(-bound, bound, generator=gen))
                b.weight.zero_()
        self.lora_A = ASILinear(a, asi_ranks, seed=seed) if asi_ranks is not None else a
        self.lora_B = b

    @property
    def asi_ranks(self) -> list[int] | None:
        return self.lora_A.ranks if isinstance(self.lora_A, ASILinear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A: what merging adds to the base weight."""
        a = self.lora_A.base_layer.weight if isinstance(self.lora_A, ASILinear) else self.lora_A.weight
        return self.lora_B.weight @ a * self.scaling

    def saved_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """For an input that is a storage of its own: A's input (whole, or its Tucker form) and
        B's input A(x) (rank wide); the frozen base saves only its weight."""
        shape = tuple(int(s) for s in input_shape)
        rows = math.prod(shape[:-1])
        a_input = (self.lora_A.saved_bytes(shape, dtype) if isinstance(self.lora_A, ASILinear)
                   else math.prod(shape) * elem_bytes(dtype))
        return a_input + rows * self.rank * elem_bytes(dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"
