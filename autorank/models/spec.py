"""What the `model` config group builds (autorank/conf/model/*.yaml): a factory and its weights."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

FACTORY_MODULE = "autorank.models"
# Plan files and study storages written before autorank.models existed name the old module.
FACTORY_ALIASES = {"autorank.workload.models": FACTORY_MODULE}


def factory_path(fn: Callable[..., nn.Module]) -> str:
    """'module.function' of a model factory; autorank's own by their public module
    (autorank.models.mcunet_like), the name a plan file records."""
    import autorank.models as models

    if getattr(models, fn.__name__, None) is fn:
        return f"{FACTORY_MODULE}.{fn.__name__}"
    return f"{fn.__module__}.{fn.__qualname__}"


@dataclass
class ModelSpec:
    """What the `model` config group builds: a factory plus where the base weights come from.

    `build(num_classes=..., in_channels=...)` makes a fresh network. `checkpoint`: a state-dict
    file loaded with `torch.load(weights_only=True)` instead of pretraining upstream.
    `runtime_mb`: what this model adds to the device process beyond a device profile's
    `runtime_mb` (measured with a model that needs torch alone) and the tensor model: torchvision's
    models import torchvision, numpy and Pillow, and their kernels held more on arm64. The workload
    adds it to the device's runtime, so the training budget, the predicted process peak and the
    plan file count it.
    `runtime_source`: where that figure comes from.
    """

    build: Callable[..., nn.Module]
    checkpoint: str | None = None
    runtime_mb: float = 0.0
    runtime_source: str = ""

    @property
    def name(self) -> str:
        fn = self.build.func if isinstance(self.build, functools.partial) else self.build
        return getattr(fn, "__name__", type(fn).__name__)

    def key(self) -> dict[str, Any]:
        """What determines the architecture (for cache keys)."""
        fn = self.build.func if isinstance(self.build, functools.partial) else self.build
        kwargs = dict(self.build.keywords) if isinstance(self.build, functools.partial) else {}
        return {"factory": factory_path(fn), "kwargs": {k: kwargs[k] for k in sorted(kwargs)}}

    def __call__(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        """A fresh network. A factory without a `num_classes` / `in_channels` parameter is called
        without it: a language model's classes are its vocabulary, set in its own kwargs
        (tiny_llama's vocab_size), and it reads tokens, not channels."""
        params = inspect.signature(self.build).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        return self.build(**{k: v for k, v in kwargs.items() if takes_any or k in params})
