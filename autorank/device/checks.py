"""Checks the device runner makes on what it reads before it builds or trains anything: the
form of each tensor, non-finite values in the data and the weights, and whether a batch or a
model can be held at all (torch only). Each failure is a one-line message with the fix."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

CHUNK_BYTES = 32 * 2**20  # values scanned at a time: a mapped data file stays out of memory
MB = 2**20


def tensor_form(where: str, name: str, t) -> str | None:
    """Why `t` cannot be a data set's or a checkpoint's tensor, or None: a plain (strided) tensor
    with its values in memory or a file, and at least one dimension."""
    if not isinstance(t, torch.Tensor):
        return f"{where}: {name!r} is a {type(t).__name__}, not a tensor"
    if t.layout != torch.strided:
        return (f"{where}: {name!r} is a {str(t.layout).removeprefix('torch.')} tensor: "
                f"save it dense ({name}.to_dense())")
    if t.is_meta:
        return f"{where}: {name!r} is a meta tensor (a shape without values): save the tensor with its values"
    if t.dim() == 0:
        return f"{where}: {name!r} is a single number (a 0-d tensor): it needs one entry per sample"
    return None


def count_nonfinite(t: torch.Tensor, release: Callable[[], None] | None = None) -> tuple[int, int]:
    """(NaN count, inf count) of a tensor, read CHUNK_BYTES at a time along its first dimension;
    `release` is called after each chunk (hands a mapped file's pages back). (0, 0) for integer
    tensors, which hold neither."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0, 0
    if t.dim() == 0:
        t = t.reshape(1)
    row = max(1, t[0].numel() * t.element_size())
    step = max(1, CHUNK_BYTES // row)
    nan = inf = 0
    for i in range(0, len(t), step):
        c = t[i:i + step]
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
        del c
        if release is not None:
            release()
    return nan, inf


def nonfinite_words(nan: int, inf: int) -> str:
    return " and ".join(w for w in (f"{nan:,} NaN" if nan else "", f"{inf:,} infinite" if inf else "") if w)


def check_weights_finite(state: Iterable[tuple[str, torch.Tensor]], where: str) -> str | None:
    """The first tensor of `state` holding NaN or inf, as a message, or None."""
    for name, t in state:
        nan, inf = count_nonfinite(t)
        if nan or inf:
            return (f"{where}'s {name} holds {nonfinite_words(nan, inf)} values: the checkpoint is damaged "
                    "or came from a diverged run; pass the checkpoint of a run whose loss stayed finite")
    return None


def sample_bytes(split) -> int:
    """Bytes of one sample of `split` as a batch holds it (float32 images after any resize, int64
    tokens), plus its index and label."""
    x = getattr(split, "x", None)
    size, channels = getattr(split, "size", None), getattr(split, "channels", 3)
    if split.kind == "token":
        values = math.prod(x.shape[1:]) * 8
    elif size is not None and (x is None or x.dtype == torch.uint8):
        values = channels * size[0] * size[1] * 4  # decoded / resized to the plan's input
    else:
        values = math.prod(x.shape[1:]) * 4
    return values + 16


def batch_refusal(bs: int, split, allowed: tuple[int, str] | None) -> str | None:
    """Why a batch of `bs` samples of `split` cannot be held, or None: its inputs alone are above
    the memory this process may use (`allowed`: memory.memory_allowed())."""
    need = bs * sample_bytes(split)
    if allowed is None or need <= allowed[0]:
        return None
    return (f"a batch of {bs:,} samples needs {need / MB:,.0f} MB for its inputs alone, more than the "
            f"{allowed[0] / MB:,.0f} MB this process may use ({allowed[1]}): pass a smaller --batch-size, "
            "or export the plan for a smaller batch")
