"""ASI and HOSVD_eps layers: peft-style wrappers around nn.Conv2d / nn.Linear.

A wrapper keeps the original as ``base_layer`` (weights shared). When the weight needs a gradient
(grad mode on and ``weight.requires_grad``) the input is factorised and only the Tucker core and
factors are saved; the weight gradient comes from them (functional.py). When only the input or
bias needs a gradient, the frozen path runs (exact grad_input, no activation saved). Otherwise
(no_grad, inference_mode, nothing requires grad) the plain base layer runs and the warm-start
state is untouched. The train/eval flag plays no part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import TuckerLayer, elem_bytes
from .functional import (
    ConvGeometry,
    FrozenConv2dFn,
    FrozenLinearFn,
    ShortcutConv2dFn,
    ShortcutLinearFn,
)
from .tucker import (
    check_eps,
    clip_ranks,
    compute_dtype,
    eps_rank,
    hosvd_ranks,
    subspace_iteration_step,
    tucker_core,
    unfold,
)

__all__ = ["ASIConv2d", "ASILinear", "HOSVDConv2d", "HOSVDLinear", "ASIFactorizer", "HOSVDFactorizer",
           "TuckerConv2d", "TuckerLinear"]


class ASIFactorizer:
    """One warm-started subspace-iteration step per mode (DESIGN section 2).

    U_n = QR(X_(n) X_(n)^T U_n_prev), computed mode after mode on the progressively projected
    tensor (``subspace_iteration_step``). State:
    the previous U_n per mode, in >= fp32, restarted from ``seed`` whenever the input shape,
    dtype or device changes. A private generator (CPU) draws the start; the global RNG is never
    touched. Plain attributes, so nothing lands in a state_dict.
    """

    needs_data = False  # fixed ranks: known from the input's shape alone

    def __init__(self, ranks: Sequence[int], seed: int = 0):
        ranks = [int(r) for r in ranks]
        bad = [r for r in ranks if r < 1]
        if bad:
            raise ValueError(f"ASI ranks must all be >= 1, got {ranks}")
        self.ranks = ranks
        self.seed = int(seed)
        self.restarts = 0  # starts drawn so far (each shape change draws a new one)
        self.cold_start_iters = 2  # extra iterations on a cold start (see __call__)
        self.state: list[torch.Tensor | None] | None = None
        self.state_key = None
        self.record = False  # keep (core, factors) of the last step for tests / debugging
        self.last = None

    def reset(self) -> None:
        self.state, self.state_key, self.restarts, self.last = None, None, 0, None

    def _start(self, shape, ranks, cdtype, device) -> list[torch.Tensor | None]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.restarts)
        self.restarts += 1
        return [
            None if r == s else torch.randn(s, r, generator=gen, dtype=cdtype).to(device)
            for s, r in zip(shape, ranks)
        ]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        shape = tuple(x.shape)
        ranks = clip_ranks(self.ranks, shape)
        cdtype = compute_dtype(x.dtype)
        key = (shape, cdtype, x.device)
        xc = x.detach().to(cdtype)
        if self.state is None or self.state_key != key:
            self.state, self.state_key = self._start(shape, ranks, cdtype, x.device), key
            # A cold start from a random subspace: a few extra iterations on this first batch, so
            # that the first steps' gradients are not taken in a nearly random subspace (with
            # short fine-tuning runs, tens of steps, that costs accuracy). Warm steps do one.
            for _ in range(self.cold_start_iters):
                _, qs = subspace_iteration_step(xc, ranks, self.state)
                self.state = [q if q is not None else u for q, u in zip(qs, self.state)]
        core, qs = subspace_iteration_step(xc, ranks, self.state)
        factors = [None if q is None else q.to(x.dtype) for q in qs]
        self.state = [q if q is not None else u for q, u in zip(qs, self.state)]
        core = core.to(x.dtype)
        if self.record:
            self.last = (core, factors)
        return core, factors

    def ranks_for(self, x: torch.Tensor) -> list[int]:
        return list(self.ranks)

    def default_ranks(self) -> list[int]:
        return self.ranks

    def state_bytes(self, input_shape, dtype) -> int:
        """Bytes of the warm-start factors held between steps (in the factorisation dtype)."""
        ranks = clip_ranks(self.ranks, input_shape)
        n = sum(s * r for s, r in zip(input_shape, ranks) if r < s)
        return n * elem_bytes(compute_dtype(dtype))


class HOSVDFactorizer:
    """HOSVD_eps (NeurIPS 2024 baseline): a full SVD of every mode-n unfolding each step, rank =
    smallest k whose squared singular values reach eps of the total (same rule as hosvd_ranks)."""

    needs_data = True  # the ranks come from the input's singular values

    def __init__(self, eps: float):
        check_eps(eps)
        self.eps = float(eps)
        self.record = False
        self.last = None
        self.last_ranks: list[int] | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        xc = x.detach().to(compute_dtype(x.dtype))
        fc: list[torch.Tensor | None] = []
        ranks = []
        for n in range(x.dim()):
            u, s, _ = torch.linalg.svd(unfold(xc, n), full_matrices=False)
            k = eps_rank(s, self.eps)
            ranks.append(k)
            fc.append(None if k == x.shape[n] else u[:, :k])
        core = tucker_core(xc, fc).to(x.dtype)
        # fresh (I_n, k) tensors in the input dtype, not views keeping the whole U alive
        factors = [None if f is None else f.to(x.dtype, copy=True) for f in fc]
        self.last_ranks = ranks
        if self.record:
            self.last = (core, factors)
        return core, factors

    def ranks_for(self, x: torch.Tensor) -> list[int]:
        return hosvd_ranks(x, self.eps)

    def default_ranks(self) -> list[int]:
        if self.last_ranks is None:
            raise ValueError("HOSVD ranks depend on the data: pass ranks= (e.g. hosvd_ranks(x, eps))")
        return self.last_ranks

    def state_bytes(self, input_shape, dtype) -> int:
        return 0  # a fresh SVD every step: nothing kept


def _route(layer: TuckerLayer, x: torch.Tensor, shortcut_fn, frozen_fn, *frozen_args) -> torch.Tensor:
    """The shortcut only when the weight needs a gradient; the frozen path (exact grad_input,
    nothing saved) when only the input or bias does; the plain layer when nothing does."""
    base = layer.base_layer
    w, b = base.weight, base.bias
    if not torch.is_grad_enabled():
        return base(x)
    if w.requires_grad:
        return shortcut_fn.apply(x, w, b, layer)
    if x.requires_grad or (b is not None and b.requires_grad):
        return frozen_fn.apply(x, w, b, *frozen_args)
    return base(x)


class TuckerConv2d(TuckerLayer):
    """A TuckerLayer around an nn.Conv2d (ASIConv2d, HOSVDConv2d)."""

    def __init__(self, base: nn.Conv2d, factorizer):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(base).__name__}")
        super().__init__(base, factorizer)
        self.geometry = ConvGeometry(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _route(self, x, ShortcutConv2dFn, FrozenConv2dFn, self.geometry)


class TuckerLinear(TuckerLayer):
    """A TuckerLayer around an nn.Linear (ASILinear, HOSVDLinear)."""

    def __init__(self, base: nn.Linear, factorizer):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(base).__name__}")
        super().__init__(base, factorizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _route(self, x, ShortcutLinearFn, FrozenLinearFn)


class ASIConv2d(TuckerConv2d):
    """ASI conv: ranks (batch, channels, height, width), one warm-started step per mode."""

    def __init__(self, base: nn.Conv2d, ranks: Sequence[int], seed: int = 0):
        if len(ranks) != 4:
            raise ValueError(f"ASIConv2d needs 4 ranks (batch, channels, height, width), got {list(ranks)}")
        super().__init__(base, ASIFactorizer(ranks, seed))

    @property
    def ranks(self) -> list[int]:
        return list(self.factorizer.ranks)

    @property
    def seed(self) -> int:
        return self.factorizer.seed

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, seed={self.seed}"


class ASILinear(TuckerLinear):
    """ASI linear: one rank per input dim ((N, in), (B, L, in), (B, H, W, in), ...)."""

    def __init__(self, base: nn.Linear, ranks: Sequence[int], seed: int = 0):
        if len(ranks) < 1:
            raise ValueError("ASILinear needs one rank per input dim, got none")
        super().__init__(base, ASIFactorizer(ranks, seed))

    ranks = ASIConv2d.ranks
    seed = ASIConv2d.seed
    extra_repr = ASIConv2d.extra_repr


class HOSVDConv2d(TuckerConv2d):
    """HOSVD_eps conv: full SVD per mode every step, ranks from explained variance eps."""

    def __init__(self, base: nn.Conv2d, eps: float):
        super().__init__(base, HOSVDFactorizer(eps))

    @property
    def eps(self) -> float:
        return self.factorizer.eps

    @property
    def last_ranks(self) -> list[int] | None:
        return self.factorizer.last_ranks

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class HOSVDLinear(TuckerLinear):
    def __init__(self, base: nn.Linear, eps: float):
        super().__init__(base, HOSVDFactorizer(eps))

    eps = HOSVDConv2d.eps
    last_ranks = HOSVDConv2d.last_ranks
    extra_repr = HOSVDConv2d.extra_repr

