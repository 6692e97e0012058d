"""asi: Activation Subspace Iteration. The layer keeps a Tucker form of its input (core +
factors at fixed ranks, one per input mode, warm-started from the step before) instead of the
input, and computes its weight gradient from it (autorank.shortcut ASIConv2d / ASILinear).

Plan `asi[8,64,4,4]` (the ranks); search keys `asi@<level>` (the ranks: HOSVD_eps ranks of the
layer's input at that explained-variance level, from the profile) and `asi@<level>:b` (the batch
mode kept whole); codes `.9`, `.9b`. Saved bytes: the core and factors (the layer's own
formula); FLOPs: the subspace iteration's QR (Householder: geqrf + householder_product).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autorank import shortcut
from autorank.errors import ConfigError, PlanError
from autorank.methods.base import (KEEP_BATCH, Choice, KeyInfo, Method, check_ranks, level_code, level_key,
                                   register_method)
from autorank.shortcut.tucker import clip_ranks, compute_dtype

aten = torch.ops.aten
_RE = re.compile(r"^asi(?:\[([^\]]*)\])?$")


def format_ranks(ranks: Sequence[int]) -> str:
    return "asi[" + ",".join(str(r) for r in ranks) + "]"


def parse_ranks(text: str, arg: str | None, example: str = "asi[8,64,4,4]") -> list[int]:
    """The ranks inside asi[...] (PlanError naming `text` when there are none or one is no int)."""
    if not arg:
        raise PlanError(f"cannot parse choice {text!r}: asi needs ranks, e.g. {example}")
    try:
        return [int(r) for r in arg.split(",")]
    except ValueError as e:
        raise PlanError(f"cannot parse choice {text!r}: asi ranks are whole numbers >= 1, e.g. {example}") from e


def parse_level(key: str) -> KeyInfo:
    """'asi@0.9' / 'asi@0.9:b' -> KeyInfo (ConfigError when the level is no number in (0, 1])."""
    body = key.removeprefix("asi@")
    keep = body.endswith(KEEP_BATCH)
    try:
        level = float(body.removesuffix(KEEP_BATCH))
    except ValueError:
        raise ConfigError(f"unknown choice {key!r}: expected asi@<level> or asi@<level>:b, "
                          "the level a number in (0, 1]") from None
    return KeyInfo("asi", level=level, keep_batch=keep)


def tucker_saved_rule(tracer, module: shortcut.TuckerLayer, x: torch.Tensor) -> None:
    """What an ASI / HOSVD layer keeps: its core and stored factors, a new storage, or the input
    itself when nothing is compressed. A frozen weight keeps nothing (the layer runs frozen)."""
    if not module.trains_weight:
        return
    ranks = tracer.untraced(module.ranks_for, x)  # ASI: fixed; HOSVD: from this input
    nbytes = int(module.saved_bytes(tuple(x.shape), x.dtype, ranks=ranks))
    tracer.count_input(nbytes)
    if clip_ranks(ranks, x.shape) == list(x.shape) and compute_dtype(x.dtype) == x.dtype:
        tracer.save(x)  # nothing compressed: the "core" is the input itself
    else:
        tracer.save_fresh(nbytes)


# -- FLOPs of the subspace iteration's QR (Golub & Van Loan, Matrix Computations, 4th ed., 5.2) --
def qr_flops(m: int, n: int, with_q: bool = True) -> int:
    """Householder QR of an m x n matrix, R only: 2 M k^2 - 2 k^3 / 3 (k = min, M = max); with the
    thin Q formed too, plus LAPACK orgqr's count."""
    big, k = max(m, n), min(m, n)
    r = 2 * big * k * k - (2 * k**3) // 3
    return r + householder_product_flops(big, k, k) if with_q else r


def householder_product_flops(m: int, n: int, k: int) -> int:
    """LAPACK orgqr: the m x n Q from k reflectors, 4mnk - 2(m+n)k^2 + 4k^3/3."""
    return 4 * m * n * k - 2 * (m + n) * k * k + (4 * k**3) // 3


def _batch(shape) -> int:
    return math.prod(shape[:-2])


# The aten schemas' defaulted arguments do not reach the formulas when the caller left them out,
# so the outputs' shapes decide: an empty Q is not computed.
def _qr(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2:]
    with_q = out_shape is None or math.prod(out_shape[0]) > 0
    return _batch(a_shape) * qr_flops(m, n, with_q=with_q)


def _geqrf(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2:]
    return _batch(a_shape) * qr_flops(m, n, with_q=False)


def _householder_product(a_shape, tau_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2:]
    return _batch(a_shape) * householder_product_flops(m, n, tau_shape[-1])


class ASI(Method):
    name = "asi"
    summary = "the input kept in Tucker form at fixed ranks, warm-started subspace iteration"
    fields = ("ranks",)
    space_choices = ("asi",)
    layer_types = (shortcut.ASIConv2d, shortcut.ASILinear)
    flop_formulas = {aten.linalg_qr: _qr, aten.geqrf: _geqrf, aten.linalg_householder_product: _householder_product}
    notation = "asi[r,...]"

    def validate(self, choice: Choice) -> dict:
        return {"ranks": check_ranks(self.name, choice.ranks)}

    def format(self, choice: Choice) -> str:
        return format_ranks(choice.ranks)

    def parse(self, text: str) -> Choice | None:
        m = _RE.match(text)
        return None if m is None else Choice.asi(parse_ranks(text, m.group(1)))

    def expand(self, space_choice: str, space) -> list[str]:
        return [level_key(lv, v == "keep_batch") for lv in space.levels for v in space.variants]

    def parse_key(self, key: str) -> KeyInfo | None:
        return parse_level(key) if key.startswith("asi@") else None

    def key_choice(self, key: str, ranks: Mapping[str, Sequence[int]]) -> Choice:
        return Choice.asi(tuple(ranks[key]))

    def code(self, key: str) -> str:
        info = parse_level(key)
        return level_code(info.level, info.keep_batch)

    def check(self, module: nn.Module, choice: Choice, name: str) -> None:
        conv = isinstance(module, nn.Conv2d)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise PlanError(f"plan layer {name!r}: an asi choice needs a conv or linear layer, "
                            f"it is {type(module).__name__}")
        if (conv and len(choice.ranks) != 4) or len(choice.ranks) < 2:
            need = "4 (batch, channels, height, width)" if conv else "at least 2 (batch, ..., features)"
            raise PlanError(f"plan layer {name!r}: {choice} gives {len(choice.ranks)} ASI ranks, the layer needs {need}")

    def build(self, module: nn.Module, choice: Choice, name: str) -> nn.Module:
        cls = shortcut.ASIConv2d if isinstance(module, nn.Conv2d) else shortcut.ASILinear
        return cls(module, choice.ranks)

    def saved_rule(self, tracer, module, args) -> None:
        tucker_saved_rule(tracer, module, args[0])


ASI_METHOD = register_method(ASI())
