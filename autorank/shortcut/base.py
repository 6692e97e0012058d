"""The one interface of every layer a plan injects (like peft's BaseTunerLayer).

Every module autorank puts into a model subclasses ``ShortcutLayer``: it wraps the original as
``base_layer`` (weights shared, so undoing the swap is putting the original back) and states,
beside its math, the bytes its autograd node saves for an input of a given shape. The layers that
compress their input (ASI, HOSVD_eps) subclass ``TuckerLayer``, which adds what the cost model
needs of them: the factorizer, the ranks an input is kept at, the state held between steps.

The plan and cost layers check ``isinstance`` against these classes, never ``hasattr``: a module
that does not subclass them is an ordinary module to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .functional import tucker_saved_numel
from .tucker import clip_ranks

__all__ = ["ShortcutLayer", "TuckerLayer", "BATCH_NORMS", "elem_bytes"]

# torch's BatchNorm modules (their common base, nn.modules.batchnorm._BatchNorm, is private)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def elem_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


class ShortcutLayer(nn.Module):
    """A wrapper around ``base_layer`` that a plan swaps in (and remove_plan swaps out).

    ``traced``: False (the default), the cost model takes the layer's ``saved_bytes`` formula
    and does not look inside; True, it traces the layer's forward op by op like any module (a
    composite of ordinary layers, such as LoRA, whose input storage others may share).
    ``keeps_children``: False (the default), the wrapper's submodules are its own internals;
    True, they are the original module's submodules under their original names (a container
    companion such as LeanSwiGLU): code that sees a plan through walks into them."""

    traced = False
    keeps_children = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def get_base_layer(self) -> nn.Module:
        """The original module (peft's name for it)."""
        return self.base_layer

    # The base layer's weight and bias, read through the wrapper (as peft's layers do): code that
    # reads `layer.weight` of a module it calls (peft's LoRA reads lora_A.weight.dtype) works on
    # a wrapped one. Not parameters of the wrapper: they stay registered under base_layer only.
    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def saved_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the autograd node saves for one training forward on an input of this shape and
        dtype (parameters, resident anyway, are not counted)."""
        raise NotImplementedError(f"{type(self).__name__} must state its saved bytes")

    def state_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes kept between training steps (none unless a layer says so)."""
        return 0


class TuckerLayer(ShortcutLayer):
    """A conv / linear wrapper that saves a Tucker form (core + factors) of its input instead of
    the input when its weight trains. ``factorizer(x) -> (core, factors)`` computes the form;
    the factorizer also says which ranks an input gets (``ranks_for``, ``needs_data``)."""

    def __init__(self, base_layer: nn.Module, factorizer):
        super().__init__(base_layer)
        self.factorizer = factorizer

    @property
    def trains_weight(self) -> bool:
        """Whether the weight requires grad (else the layer runs frozen and saves no input)."""
        return self.base_layer.weight.requires_grad

    @property
    def needs_data(self) -> bool:
        """Whether the ranks depend on the input's values (HOSVD_eps), not only its shape (ASI):
        a shape-only (meta-device) trace cannot know them."""
        return self.factorizer.needs_data

    def ranks_for(self, x: torch.Tensor) -> list[int]:
        """The ranks (one per input mode, before clipping to the shape) `x` is kept at."""
        return self.factorizer.ranks_for(x)

    def saved_bytes(self, input_shape, dtype: torch.dtype = torch.float32,
                    ranks: Sequence[int] | None = None) -> int:
        """Core + stored factors, in the input dtype (the weight, a parameter, is not counted).
        HOSVD layers need ``ranks`` (they depend on the data; default: the last step's ranks)."""
        shape = tuple(int(s) for s in input_shape)
        ranks = clip_ranks(ranks if ranks is not None else self.factorizer.default_ranks(), shape)
        return tucker_saved_numel(shape, ranks) * elem_bytes(dtype)

    def state_bytes(self, input_shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state kept between steps (ASI warm-start factors; 0 for HOSVD)."""
        return self.factorizer.state_bytes(tuple(int(s) for s in input_shape), dtype)

    def record_factors(self, on: bool = True):
        """Keep the last (core, factors) so tests can rebuild the input the gradient used."""
        self.factorizer.record = on
        if not on:
            self.factorizer.last = None
        return self

    def last_factors(self):
        """(core, factors) of the last factorisation (needs ``record_factors()`` first)."""
        if self.factorizer.last is None:
            raise RuntimeError("no factors recorded: call layer.record_factors() before the forward")
        return self.factorizer.last
