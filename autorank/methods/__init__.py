"""Training methods, one module each, registered once (autorank.methods.base): frozen, full,
asi, hosvd, lora (LoRA and LoRA + ASI) and recompute. `describe()` lists them.

A new method is one module here ending in `register_method(...)` and one import below."""

from autorank.methods.base import (KEEP_BATCH, MAX_RANK, Choice, KeyInfo, Method, flop_formulas, get_method, is_exact_key,
                                   key_choice, kinds, level_key, method_of_key, method_of_layer, methods,
                                   parse_choice, parse_key, register_method, short_code, space_choices,
                                   space_method)
from autorank.methods import frozen, full, asi, hosvd, lora, recompute  # noqa: E402,F401  (registration order)
from autorank.methods.lora import lora_key, parse_lora_key
from autorank.methods.recompute import Recompute


def describe() -> str:
    """One line per registered method: its plan notation and what it does."""
    return "\n".join(f"{m.name:<10} {m.notation or m.name:<32} {m.summary}" for m in methods())


__all__ = ["Choice", "KEEP_BATCH", "KeyInfo", "MAX_RANK", "Method", "Recompute", "describe", "flop_formulas",
           "get_method", "is_exact_key", "key_choice", "kinds", "level_key", "lora_key", "method_of_key", "method_of_layer",
           "methods", "parse_choice", "parse_key", "parse_lora_key", "register_method", "short_code",
           "space_choices", "space_method"]
