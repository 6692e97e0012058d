"""Tucker helpers shared by the ASI / HOSVD layers: mode products, rank choice, reconstruction.

Convention: a factor U_n has shape (I_n, r_n) with orthonormal columns; ``None`` stands for the
identity (mode n not compressed). The core of x is S = x x_0 U_0^T x_1 U_1^T ..., and the
reconstruction is S x_0 U_0 x_1 U_1 ...
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "compute_dtype",
    "mode_product",
    "physical_order",
    "inverse_permutation",
    "mode_gram_apply",
    "eps_rank",
    "hosvd_ranks",
    "tucker_core",
    "tucker_reconstruct",
    "check_eps",
    "clip_ranks",
    "orthonormalize",
    "subspace_iteration_step",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorisations run in at least fp32 (QR / SVD in half precision are unstable or absent)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(shape: Sequence[int], n: int) -> tuple[int, int, int]:
    # (prod of dims before n, I_n, prod of dims after n)
    return math.prod(shape[:n]), shape[n], math.prod(shape[n + 1 :])


def physical_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation p with x.permute(p) contiguous (x's modes in memory order: (0, 2, 3, 1)
    for a channels-last NCHW tensor), or None when x is contiguous or no permutation is."""
    if x.is_contiguous():
        return None
    # ties (size-1 modes) keep their logical order; the check below decides
    p = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), d)))
    return p if x.permute(p).is_contiguous() else None


def inverse_permutation(p: Sequence[int]) -> list[int]:
    return [p.index(d) for d in range(len(p))]


def mode_product(x: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """x x_n m^T for m of shape (I_n, r): mode n of x (size I_n) becomes size r.

    Expansion (S x_n U) is ``mode_product(S, U.T, n)``. One GEMM (or one broadcast bmm for a
    middle mode), no permute copy. A permuted-contiguous x (a channels-last activation or output
    gradient) is multiplied in its memory order and the result keeps that layout: a reshape of
    the logical view would copy the whole tensor (the copies that made ASI steps slower than
    plain ones, docs/BENCHMARKS.md section 15).
    """
    p = physical_order(x)
    if p is not None:
        return mode_product(x.permute(p), m, p.index(n)).permute(inverse_permutation(p))
    shape = list(x.shape)
    a, i, b = _split(shape, n)
    r = m.shape[1]
    if b == 1:  # last mode: (A, I) @ (I, r)
        out = x.reshape(a, i) @ m
    elif a == 1:  # first mode: (r, I) @ (I, B)
        out = m.t() @ x.reshape(i, b)
    else:  # middle mode: (r, I) @ (A, I, B) -> (A, r, B)
        out = torch.matmul(m.t(), x.reshape(a, i, b))
    shape[n] = r
    return out.reshape(shape)


def mode_gram_apply(x: torch.Tensor, p: torch.Tensor, n: int) -> torch.Tensor:
    """X_(n) P_(n)^T for p = x x_n U^T: contracts every mode but n -> (I_n, r).

    With p = mode_product(x, U, n) this is one subspace-iteration step X_(n) X_(n)^T U.
    """
    a, i, b = _split(list(x.shape), n)
    r = p.shape[n]
    if b == 1:
        return x.reshape(a, i).t() @ p.reshape(a, r)
    if a == 1:
        return x.reshape(i, b) @ p.reshape(r, b).t()
    # (A, I, B) @ (A, B, r) summed over A: A small GEMMs, no permute copy of x
    return torch.matmul(x.reshape(a, i, b), p.reshape(a, r, b).transpose(1, 2)).sum(0)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Q of a reduced QR of y (I, r), r <= I. Householder via geqrf + householder_product: the
    same Q as torch.linalg.qr without forming R (linalg.qr's triu costs ms on tiny matrices)."""
    a, tau = torch.geqrf(y)
    return torch.linalg.householder_product(a, tau)


def _cyclic_cost(shape, ranks, order) -> int:
    numel, cost = math.prod(shape), 0
    last = max((k for k, n in enumerate(order) if ranks[n] < shape[n]), default=-1)
    for n in order[: last + 1]:
        if ranks[n] < shape[n]:
            cost += 3 * numel * ranks[n]  # three GEMMs
            numel = numel // shape[n] * ranks[n]
        else:
            cost += 2 * numel  # a rotation copy
    return cost


@functools.lru_cache(maxsize=256)
def cyclic_schedule(shape: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[bool, tuple[int, ...]]:
    """(front, modes): compress from the front (modes 0, 1, ...) or from the back (N-1, N-2, ...),
    whichever does less work, stopping after the last compressed mode."""
    n = len(shape)
    best = None
    for front, order in ((True, tuple(range(n))), (False, tuple(reversed(range(n))))):
        cost = _cyclic_cost(shape, ranks, order)
        if best is None or cost < best[0]:
            best = (cost, front, order)
    _, front, order = best
    last = max((k for k, m in enumerate(order) if ranks[m] < shape[m]), default=-1)
    return front, order[: last + 1]


def subspace_iteration_step(x: torch.Tensor, ranks, prev):
    """One warm-started subspace-iteration step per mode, sequentially on the projected tensor.

    x: (I_0, ..., I_{N-1}) in the factorisation dtype; ranks clipped; prev[n]: (I_n, r_n) start
    for the compressed modes. Returns (core, factors) with factors[n] = QR(X_(n) X_(n)^T prev[n]).Q.

    Each step works on the mode at the front (or back) of memory and leaves the projected mode at
    the other end (a cyclic rotation of the modes): the three products are plain GEMMs on
    transposed views, with no permute copies and no batched small matmuls.
    """
    p = physical_order(x)
    if p is not None:  # factorise in memory order (no copy of x); the core keeps x's layout
        core, qs = subspace_iteration_step(x.permute(p), [ranks[d] for d in p], [prev[d] for d in p])
        inv = inverse_permutation(p)
        return core.permute(inv), [qs[d] for d in inv]
    shape = tuple(int(s) for s in x.shape)
    front, order = cyclic_schedule(shape, tuple(ranks))
    phys = list(range(len(shape)))  # logical mode held by each physical dim
    sizes = list(shape)
    t = x
    factors: list[torch.Tensor | None] = [None] * len(shape)
    for n in order:
        i = sizes[phys.index(n)]
        rest = t.numel() // i
        if front:
            xm = t.reshape(i, rest)  # X_(n) as stored
            if ranks[n] < i:
                p = xm.t() @ prev[n]  # (rest, r) = X^T U_prev
                q = orthonormalize(xm @ p)  # (I, r)
                t = xm.t() @ q  # (rest, r): mode n projected, moved to the back
            else:
                t = xm.t().contiguous()
            phys, sizes = phys[1:] + [n], sizes[1:] + [min(i, ranks[n])]
        else:
            xm = t.reshape(rest, i)  # X_(n)^T as stored
            if ranks[n] < i:
                p = xm @ prev[n]  # (rest, r)
                q = orthonormalize(xm.t() @ p)  # (I, r)
                t = q.t() @ xm.t()  # (r, rest): mode n projected, moved to the front
            else:
                t = xm.t().contiguous()
            phys, sizes = [n] + phys[:-1], [min(i, ranks[n])] + sizes[:-1]
        if ranks[n] < i:
            factors[n] = q
    t = t.reshape(sizes)
    if phys != sorted(phys):
        t = t.permute([phys.index(m) for m in range(len(shape))]).contiguous()
    return t, factors


def unfold(x: torch.Tensor, n: int) -> torch.Tensor:
    """Mode-n unfolding X_(n): (I_n, prod of the other dims)."""
    return x.movedim(n, 0).reshape(x.shape[n], -1)


def eps_rank(s: torch.Tensor, eps: float) -> int:
    """Smallest k >= 1 whose k largest squared singular values reach eps of the total."""
    e = s.double().square()
    total = e.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor([eps], dtype=cum.dtype, device=cum.device)).item()) + 1
    return max(1, min(k, s.numel()))


def check_eps(eps: float) -> None:
    """ValueError unless eps (an explained-variance level) is in (0, 1]."""
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps (explained variance) must be in (0, 1], got {eps}")


@torch.no_grad()
def hosvd_ranks(x: torch.Tensor, eps: float) -> list[int]:
    """HOSVD_eps ranks of x: per mode, the smallest k whose squared singular values of the mode-n
    unfolding reach eps of the total (computed in >= fp32)."""
    check_eps(eps)
    xc = x.detach().to(compute_dtype(x.dtype))
    return [eps_rank(torch.linalg.svdvals(unfold(xc, n)), eps) for n in range(x.dim())]


def clip_ranks(ranks: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Ranks clipped to the mode sizes (rank < 1 is checked when a layer is built)."""
    if len(ranks) != len(shape):
        raise ValueError(f"got {len(ranks)} ranks for an input of {len(shape)} modes {tuple(shape)}")
    return [min(int(r), int(s)) for r, s in zip(ranks, shape)]


def tucker_core(x: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """S = x x_n U_n^T over the modes with a factor."""
    for n, u in enumerate(factors):
        if u is not None:
            x = mode_product(x, u, n)
    return x


def tucker_reconstruct(core: torch.Tensor, factors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """S x_0 U_0 x_1 U_1 ... (None factor = identity)."""
    x = core
    for n, u in enumerate(factors):
        if u is not None:
            x = mode_product(x, u.t(), n)
    return x
