"""The loss of one training step, for the cost model's simulation and its live measurement alike.

Two tasks: "class" (cross-entropy, classes on dim 1: images, (B, C) logits and (B,) labels) and
"token" (cross-entropy over a vocabulary on the last dim: a language model's (B, L, V) logits and
(B, L) next-token labels, flattened to (B*L, V) as nanoGPT and Hugging Face do). A model may
return its logits as a tensor, as a Hugging Face ModelOutput (`.logits`) or as a tuple whose
first item they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "logits_of", "label_shape", "training_loss"]

LOSSES = ("class", "token")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    return loss


def logits_of(out) -> torch.Tensor:
    """The logits tensor among a model's outputs (a tensor, `.logits`, or the first item)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def label_shape(logits_shape, loss: str = "class") -> tuple[int, ...]:
    """The int64 labels' shape for logits of this shape."""
    shape = tuple(int(s) for s in logits_shape)
    return shape[:-1] if check_loss(loss) == "token" else (shape[0], *shape[2:])


def training_loss(out, labels: torch.Tensor, loss: str = "class") -> torch.Tensor:
    """Mean cross-entropy of the model output `out` against int64 `labels`."""
    logits = logits_of(out)
    if check_loss(loss) == "token":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(logits, labels)
