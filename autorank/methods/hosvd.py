"""hosvd: HOSVD_eps. The layer keeps a Tucker form of its input whose ranks a full SVD per mode
picks every step (the smallest reaching the explained variance eps); autorank.shortcut
HOSVDConv2d / HOSVDLinear. Plan `hosvd[0.8]`; no search key (the search uses ASI at the ranks
HOSVD_eps finds on calibration batches). Saved bytes: the core and factors at the ranks the
input gives (the cost model traces such layers on real tensors); FLOPs: the per-mode SVDs.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from autorank import shortcut
from autorank.errors import PlanError
from autorank.methods.asi import _batch, tucker_saved_rule
from autorank.methods.base import Choice, Method, register_method

aten = torch.ops.aten
_RE = re.compile(r"^hosvd(?:\[([^\]]*)\])?$")


# -- FLOPs of the SVDs (Golub & Van Loan, 8.6; R-SVD), k = min(m, n), M = max(m, n) ------------
def svd_flops(m: int, n: int, compute_uv: bool = True, full_matrices: bool = False) -> int:
    """Values only 2 M k^2 + 2 k^3; thin U, V: 6 M k^2 + 20 k^3; full U, V: 4 M^2 k + 22 k^3."""
    big, k = max(m, n), min(m, n)
    if not compute_uv:
        return 2 * big * k * k + 2 * k**3
    if full_matrices:
        return 4 * big * big * k + 22 * k**3
    return 6 * big * k * k + 20 * k**3


def eigh_flops(n: int, compute_v: bool = True) -> int:
    """Symmetric QR: values only 4 n^3 / 3; with vectors 9 n^3."""
    return 9 * n**3 if compute_v else (4 * n**3) // 3


def _svd(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2:]
    u = out_shape[0] if out_shape is not None else (m, min(m, n))
    compute_uv = math.prod(u) > 0
    full = compute_uv and u[-1] == m and m > min(m, n)
    return _batch(a_shape) * svd_flops(m, n, compute_uv, full)


def _eigh(a_shape, *args, out_shape=None, **kwargs) -> int:
    compute_v = out_shape is None or math.prod(out_shape[1]) > 0
    return _batch(a_shape) * eigh_flops(a_shape[-1], compute_v)


class HOSVD(Method):
    name = "hosvd"
    summary = "the input kept in Tucker form at the ranks a per-step SVD picks for explained variance eps"
    fields = ("eps",)
    layer_types = (shortcut.HOSVDConv2d, shortcut.HOSVDLinear)
    flop_formulas = {aten._linalg_svd: _svd, aten._linalg_eigh: _eigh}
    notation = "hosvd[eps]"

    def validate(self, choice: Choice) -> dict:
        try:
            eps = float(choice.eps) if choice.eps is not None else float("nan")
        except (TypeError, ValueError):
            eps = float("nan")
        if not 0.0 < eps <= 1.0:
            raise PlanError(f"a hosvd choice needs eps in (0, 1], got {choice.eps!r}")
        return {"eps": eps}

    def format(self, choice: Choice) -> str:
        return f"hosvd[{choice.eps:g}]"

    def parse(self, text: str) -> Choice | None:
        m = _RE.match(text)
        if m is None:
            return None
        if not m.group(1):
            raise PlanError(f"cannot parse choice {text!r}: hosvd needs eps, e.g. hosvd[0.8]")
        try:
            eps = float(m.group(1))
        except ValueError as e:
            raise PlanError(f"cannot parse choice {text!r}: hosvd needs eps in (0, 1], e.g. hosvd[0.8]") from e
        return Choice.hosvd(eps)

    def parse_key(self, key: str):
        return None  # no search key

    def check(self, module: nn.Module, choice: Choice, name: str) -> None:
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise PlanError(f"plan layer {name!r}: a hosvd choice needs a conv or linear layer, "
                            f"it is {type(module).__name__}")

    def build(self, module: nn.Module, choice: Choice, name: str) -> nn.Module:
        cls = shortcut.HOSVDConv2d if isinstance(module, nn.Conv2d) else shortcut.HOSVDLinear
        return cls(module, choice.eps)

    def saved_rule(self, tracer, module, args) -> None:
        tucker_saved_rule(tracer, module, args[0])


HOSVD_METHOD = register_method(HOSVD())
