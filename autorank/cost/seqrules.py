"""Saved-bytes rules for the ops of transformer blocks (what autograd saves, torch 2.14, checked
against saved_tensors_hooks on the tiny ViT and Llama of autorank.models; tests/test_transformer_cost.py).

  scaled_dot_product_attention  CPU flash kernel: q, k, v, the output, and the log-sum-exp
                                (B, H, L) in float32 (float64 for float64 inputs), plus the mask
                                when given; the math path (dropout, ...) is not covered
  layer_norm                    input, and mean and rstd (one float32 each per normalised row)
  rms_norm                      input and rstd (one float32 per row) when the input needs a
                                gradient; the normalised input when the weight trains
  embedding                     the indices (the batch of token ids), when the table trains
  pow (tensor ** scalar)        the input;  rsqrt, sqrt, reciprocal: the result
  cos, sin                      the input
  swiglu (autorank.shortcut)    gate and up when gate needs a gradient (LeanSwiGLU's product);
                                else silu(gate), a fresh tensor, when up needs one
Each rule is `rule(tracer, args, kwargs, out)`, called by autorank.cost.saved's tracer for an op
whose output needs a gradient; `tracer.save(t)` counts t's storage once, `tracer.save_fresh(n)`
a new storage of n bytes, `tracer.unknown` lists what no rule covers.
"""

from __future__ import annotations

import math

import torch

from autorank.cost.attention import sdpa_backend, sdpa_call

__all__ = ["SEQUENCE_RULES"]


def _acc_bytes(dtype: torch.dtype) -> int:
    """Bytes of the accumulation dtype norms and attention keep statistics in."""
    return 8 if dtype == torch.float64 else 4


def _rows(x: torch.Tensor, normalized_shape) -> int:
    k = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return math.prod(x.shape[: x.dim() - k])


def _arg(args, kwargs, pos: int, name: str, default=None):
    return args[pos] if len(args) > pos else kwargs.get(name, default)


def sdpa_rule(tracer, args, kwargs, out) -> None:
    call = sdpa_call(args, kwargs)
    if sdpa_backend(call) != "flash":
        tracer.unknown.append("scaled_dot_product_attention[math]")
        return
    for t in (call.query, call.key, call.value, out, call.attn_mask):
        if isinstance(t, torch.Tensor):
            tracer.save(t)
    q = call.query
    tracer.save_fresh(math.prod(q.shape[:-1]) * _acc_bytes(q.dtype))  # logsumexp (B, H, L)


def layer_norm_rule(tracer, args, kwargs, out) -> None:
    x = args[0]
    tracer.save(x)
    tracer.save_fresh(2 * _rows(x, _arg(args, kwargs, 1, "normalized_shape")) * _acc_bytes(x.dtype))


def rms_norm_rule(tracer, args, kwargs, out) -> None:
    # torch's CPU rms_norm is a composite: x * rsqrt(mean(x^2) + eps), then * weight
    x, weight = args[0], _arg(args, kwargs, 2, "weight")
    if tracer.need(x):
        tracer.save(x)
        tracer.save_fresh(_rows(x, _arg(args, kwargs, 1, "normalized_shape")) * _acc_bytes(x.dtype))  # rstd
    if isinstance(weight, torch.Tensor) and tracer.need(weight):
        tracer.save_fresh(x.numel() * x.element_size())  # the normalised x, for the weight's gradient


def embedding_rule(tracer, args, kwargs, out) -> None:
    weight = _arg(args, kwargs, 1, "weight")
    if tracer.need(weight):
        tracer.save(args[0])


def pow_rule(tracer, args, kwargs, out) -> None:
    base, exponent = args[0], _arg(args, kwargs, 1, "exponent")
    if isinstance(base, torch.Tensor) and not isinstance(exponent, torch.Tensor):
        tracer.save(base)
    else:
        tracer.unknown.append("pow(tensor exponent)")


def swiglu_rule(tracer, args, kwargs, out) -> None:
    gate, up = args[0], args[1]  # autorank.shortcut.swiglu passes both by position
    if tracer.need(gate):
        tracer.save(gate)
        tracer.save(up)
    else:  # the plain silu(gate) * up: the product keeps silu(gate) for up's gradient
        tracer.save_fresh(out.numel() * out.element_size())


def _save_result(tracer, args, kwargs, out) -> None:
    tracer.save(out)


def _save_input(tracer, args, kwargs, out) -> None:
    tracer.save(args[0])


SEQUENCE_RULES = {
    "scaled_dot_product_attention": sdpa_rule,
    "layer_norm": layer_norm_rule,
    "rms_norm": rms_norm_rule,
    "embedding": embedding_rule,
    "pow": pow_rule,
    "__pow__": pow_rule,
    "rsqrt": _save_result,
    "sqrt": _save_result,
    "reciprocal": _save_result,
    "cos": _save_input,
    "sin": _save_input,
    "swiglu": swiglu_rule,
}
