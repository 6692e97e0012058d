"""ASI / HOSVD shortcut layers and lean companions: gradients, state, bytes (small shapes, fp64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autorank.shortcut import (
    ASIConv2d,
    ASILinear,
    FrozenBatchNorm2d,
    FrozenConv2d,
    FrozenLinear,
    HOSVDConv2d,
    HOSVDLinear,
    PackedReLU,
    hosvd_ranks,
    pack_bits,
    tucker_reconstruct,
    unpack_bits,
)
from autorank.shortcut.functional import ConvGeometry, conv_weight_grad

DT = torch.float64

# id: (Conv2d kwargs, input (B, C, H, W), low ranks)
CONV_CASES = {
    "g1_3x3": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), (5, 6, 9, 8), [3, 3, 4, 3]),
    "g1_1x1": (dict(in_channels=8, out_channels=12, kernel_size=1), (5, 8, 6, 7), [2, 4, 3, 5]),
    "depthwise": (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), (5, 6, 9, 8), [3, 3, 4, 3]),
    "grouped": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4), (5, 8, 9, 8), [3, 4, 4, 3]),
    "grouped_lowr": (dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=2), (4, 16, 7, 7), [2, 2, 3, 3]),
    "multiplier": (dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4), (5, 4, 9, 8), [3, 2, 4, 3]),
    "stride2_dil2": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, stride=2, dilation=2), (5, 6, 11, 10), [3, 3, 4, 3]),
    "nonsquare_asym_pad": (dict(in_channels=6, out_channels=8, kernel_size=(3, 5), padding=(1, 2)), (5, 6, 9, 8), [3, 3, 4, 3]),
    "same_even": (dict(in_channels=6, out_channels=8, kernel_size=(4, 3), padding="same", dilation=(1, 2)), (5, 6, 9, 8), [3, 3, 4, 3]),
    "same_even_grouped": (dict(in_channels=6, out_channels=6, kernel_size=2, padding="same", groups=3), (5, 6, 9, 8), [3, 3, 4, 3]),
    "valid_stride21": (dict(in_channels=6, out_channels=8, kernel_size=3, padding="valid", stride=(2, 1)), (5, 6, 9, 8), [3, 3, 4, 3]),
    "nobias_stride3": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, stride=3, bias=False), (5, 6, 10, 8), [3, 3, 4, 3]),
    "reflect": (dict(in_channels=6, out_channels=8, kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"), (5, 6, 9, 8), [3, 3, 4, 3]),
    "replicate_s2": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, stride=2, padding_mode="replicate"), (5, 6, 9, 8), [3, 3, 4, 3]),
    "circular_dw": (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, padding_mode="circular"), (5, 6, 9, 8), [3, 3, 4, 3]),
}
# id: (in, out, input shape, low ranks)
LINEAR_CASES = {
    "2d": (10, 7, (9, 10), [4, 5]),
    "3d": (10, 7, (3, 6, 10), [2, 3, 5]),
    "4d": (10, 7, (2, 4, 5, 10), [2, 2, 3, 5]),
    "5d": (10, 7, (2, 2, 3, 3, 10), [1, 2, 2, 2, 4]),
}
CASES = [("conv", k) for k in CONV_CASES] + [("linear", k) for k in LINEAR_CASES]


def make_case(kind, name, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        kwargs, shape, low = CONV_CASES[name]
        base = nn.Conv2d(**kwargs)
    else:
        i, o, shape, low = LINEAR_CASES[name]
        base = nn.Linear(i, o)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    base = base.to(dtype)
    x = torch.randn(shape, generator=g, dtype=dtype)
    return base, x, low


def grads(layer, base, x, gy_seed=1):
    """(output, grad_input, grad_weight, grad_bias) of one forward+backward; the output gradient
    in the output's layout (channels-last after a channels-last conv, as in a training step)."""
    x = x.detach().requires_grad_(True)
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=DT).to(y.device, y.dtype)
    gy = torch.empty_like(y).copy_(gy)  # y's layout
    params = [x, base.weight] + ([base.bias] if base.bias is not None else [])
    gs = torch.autograd.grad(y, params, gy)
    return (y.detach(), *gs) + ((None,) if base.bias is None else ())


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def factor_shapes(factors):
    return [None if f is None else tuple(f.shape) for f in factors]


def expected_factor_shapes(method, x, low, eps=0.6):
    """Per mode, (mode size, rank), or None where the rank keeps the whole mode: ASI's ranks are
    `low`; HOSVD_eps's the smallest k whose squared singular values of the mode-n unfolding reach
    eps of their total."""
    out = []
    for n, d in enumerate(x.shape):
        if method == "asi":
            r = low[n]
        else:
            e = torch.linalg.svdvals(x.detach().movedim(n, 0).reshape(d, -1).double()).square()
            r = int((torch.cumsum(e, 0) / e.sum() < eps).sum()) + 1
        out.append(None if r >= d else (d, r))
    return out


# convolutions whose geometry torch's own kernels do not take as is (a crop or an explicit pad)
NON_NATIVE = {"same_even", "same_even_grouped", "reflect", "replicate_s2", "circular_dw"}


def wrap(kind, method, base, arg, **kw):
    cls = {("conv", "asi"): ASIConv2d, ("linear", "asi"): ASILinear,
           ("conv", "hosvd"): HOSVDConv2d, ("linear", "hosvd"): HOSVDLinear}[(kind, method)]
    return cls(base, arg, **kw)


@pytest.mark.parametrize("kind,name", CASES)
def test_full_rank_gradients_are_exact(kind, name):
    base, x, _ = make_case(kind, name)
    ref = grads(base, base, x)
    layer = wrap(kind, "asi", base, [10**6] * x.dim())
    out = grads(layer, base, x)
    assert rel(out[0], ref[0]) <= 1e-12
    for got, want in zip(out[1:], ref[1:]):
        if want is not None:
            assert rel(got, want) <= 1e-6


@pytest.mark.parametrize("method", ["asi", "hosvd"])
@pytest.mark.parametrize("kind,name", CASES)
def test_low_rank_weight_grad_is_grad_on_reconstruction(kind, name, method):
    base, x, low = make_case(kind, name)
    layer = wrap(kind, method, base, low if method == "asi" else 0.6).record_factors()
    for step in range(2):  # second step: warm-started
        out = grads(layer, base, x + 0.1 * step)
        core, factors = layer.last_factors()
        assert any(f is not None for f in factors)  # something was compressed
        assert factor_shapes(factors) == expected_factor_shapes(method, x + 0.1 * step, low)
        xr = tucker_reconstruct(core, factors)
        ref = grads(base, base, xr)
        exact = grads(base, base, x + 0.1 * step)
        assert rel(out[2], ref[2]) <= 1e-6  # grad_weight: exact gradient on the rank-r input
        assert rel(out[1], exact[1]) <= 1e-12  # grad_input exact
        if base.bias is not None:
            assert rel(out[3], exact[3]) <= 1e-12
    if method == "asi":
        assert list(core.shape) == [min(r, s) for r, s in zip(low, x.shape)]
    else:
        assert layer.last_ranks == hosvd_ranks(x + 0.1, 0.6)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_both_channel_paths_agree(groups):
    """Correlate-over-r1-then-U1 and expand-channels-first give the same weight gradient."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=groups).double()
    layer = ASIConv2d(conv, [3, 2, 4, 4]).record_factors()
    x = torch.randn(4, 6, 7, 7, dtype=DT)
    out = grads(layer, conv, x)
    core, f = layer.last_factors()
    geom = ConvGeometry(conv)
    gy = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    # path B by hand: expand the channels, grouped correlation
    z = tucker_reconstruct(core, [None, f[1], f[2], f[3]])
    g = torch.einsum("br,bohw->rohw", f[0], gy)
    path_b = geom.grad_weight(z, conv.weight.shape, g, groups)
    assert rel(conv_weight_grad(core, f, gy, conv.weight.shape, geom), path_b) <= 1e-10
    assert rel(out[2], path_b) <= 1e-10


def test_exact_tucker_input_plus_noise_error_at_noise_level():
    g = torch.Generator().manual_seed(3)
    shape, ranks = (8, 12, 9, 9), [2, 3, 3, 2]
    us = [torch.linalg.qr(torch.randn(s, r, generator=g, dtype=DT)).Q for s, r in zip(shape, ranks)]
    conv = nn.Conv2d(12, 10, 3, padding=1).double()
    layer = ASIConv2d(conv, ranks, seed=5)
    errs = []
    for step in range(4):  # a stream of inputs sharing the subspaces (different cores)
        x = tucker_reconstruct(torch.randn(ranks, generator=g, dtype=DT), us)
        x = x + 1e-6 * x.norm() / x.numel() ** 0.5 * torch.randn(shape, generator=g, dtype=DT)
        errs.append(rel(grads(layer, conv, x)[2], grads(conv, conv, x)[2]))
    assert max(errs[1:]) <= 1e-4  # noise at 1e-6 of the signal RMS


def test_warm_start_reproducible_from_seed_and_global_rng_untouched():
    base, x, low = make_case("conv", "g1_3x3")
    rng = torch.get_rng_state()
    outs = []
    for seed in (7, 7, 8):
        layer = ASIConv2d(base, low, seed=seed).record_factors()
        grads(layer, base, x)
        grads(layer, base, x * 1.5)
        outs.append(layer.last_factors())
    assert torch.equal(torch.get_rng_state(), rng)
    assert factor_shapes(outs[0][1]) == expected_factor_shapes("asi", x * 1.5, low)  # every mode compressed
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))  # the same seed, the same factors
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][1][0], outs[2][1][0])  # another seed, another start


def test_shape_change_restarts_state():
    base, x, low = make_case("conv", "g1_3x3")
    layer = ASIConv2d(base, low).record_factors()
    grads(layer, base, x)
    assert layer.factorizer.restarts == 1
    state = list(layer.factorizer.state)
    grads(layer, base, x)
    assert layer.factorizer.restarts == 1 and not torch.equal(state[0], layer.factorizer.state[0])
    small = x[:2]  # smaller last batch: the batch rank clips to 2 (identity)
    out = grads(layer, base, small)
    core, f = layer.last_factors()
    assert layer.factorizer.restarts == 2 and f[0] is None and core.shape[0] == 2
    assert rel(out[2], grads(base, base, tucker_reconstruct(core, f))[2]) <= 1e-6
    grads(layer, base, x)
    assert layer.factorizer.restarts == 3 and layer.factorizer.state[0].shape == (5, 3)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_no_grad_path_is_plain_and_leaves_state(mode):
    base, x, low = make_case("conv", "grouped")
    layer = ASIConv2d(base, low)
    grads(layer, base, x)
    state = list(layer.factorizer.state)
    layer.eval()  # the train/eval flag plays no part
    if mode == "no_grad":
        with torch.no_grad():
            y = layer(x * 2)
    elif mode == "inference_mode":
        with torch.inference_mode():
            y = layer(x * 2)
    else:
        base.requires_grad_(False)
        y = layer(x * 2)
        assert not y.requires_grad
    assert torch.equal(y, base(x * 2).detach())
    assert all(a is b for a, b in zip(state, layer.factorizer.state))
    assert layer.factorizer.restarts == 1
    if mode != "nothing_requires_grad":  # eval flag does not stop compression in training
        out = grads(layer, base, x * 3)
        assert not all(a is b for a, b in zip(state, layer.factorizer.state))
        assert rel(out[1], grads(base, base, x * 3)[1]) <= 1e-12


def test_frozen_weight_input_grad_only_saves_nothing():
    base, x, low = make_case("conv", "stride2_dil2")
    layer = ASIConv2d(base, low)
    base.weight.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    saved = measure_saved_bytes(lambda: layer(xg), layer)
    assert saved == 0 and layer.factorizer.state is None
    (gx,) = torch.autograd.grad(layer(xg).sum(), xg)
    (want,) = torch.autograd.grad(base(xg).sum(), xg)
    assert rel(gx, want) <= 1e-12


def test_rank_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=">= 1"):
        ASIConv2d(conv, [2, 0, 2, 2])
    with pytest.raises(ValueError, match="4 ranks"):
        ASIConv2d(conv, [2, 2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        ASILinear(nn.Linear(3, 4), [-1, 2])
    lin = ASILinear(nn.Linear(3, 4), [2, 2])
    with pytest.raises(ValueError, match="2 ranks for an input of 3 modes"):
        lin(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="eps"):
        HOSVDConv2d(conv, 0.0)


def test_state_not_in_state_dict_and_deepcopy():
    base, x, low = make_case("conv", "g1_3x3")
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    layer = ASIConv2d(base, low)
    grads(layer, base, x)
    assert set(layer.state_dict()) == {f"base_layer.{k}" for k in sd}
    assert layer.base_layer.weight is base.weight
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,name", [("conv", "g1_3x3"), ("conv", "depthwise"), ("linear", "3d")])
def test_half_precision_close_to_fp32(kind, name, dtype):
    base, x, low = make_case(kind, name, dtype=torch.float32)
    ref = grads(wrap(kind, "asi", base, low), base, x)
    hbase = copy.deepcopy(base).to(dtype)
    out = grads(wrap(kind, "asi", hbase, low), hbase, x.to(dtype))
    assert all(t.dtype == dtype for t in out if t is not None)
    for got, want in zip(out, ref):
        if want is not None:
            assert rel(got.float(), want) <= 3e-2


# ---------------------------------------------------------------- lean companions

@pytest.mark.parametrize("affine", [True, False])
def test_frozen_batchnorm_exact(affine):
    bn = nn.BatchNorm2d(5, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    bn.eval().requires_grad_(False)
    fb = FrozenBatchNorm2d(bn).train()  # eval statistics whatever the flag
    bn.eval()
    x = torch.randn(3, 5, 4, 6, dtype=DT, requires_grad=True)
    y1, y2 = fb(x), bn(x)
    gy = torch.randn_like(y1)
    assert rel(y1, y2) <= 1e-14
    assert rel(torch.autograd.grad(y1, x, gy)[0], torch.autograd.grad(y2, x, gy)[0]) <= 1e-14
    assert measure_saved_bytes(lambda: fb(x), fb) == 0 == FrozenBatchNorm2d.saved_bytes(x.shape, DT)


@pytest.mark.parametrize("base", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 1.5), nn.ReLU(inplace=True)])
def test_packed_relu_exact(base):
    x = torch.randn(3, 5, 7, dtype=DT) * 4  # numel 105: not a multiple of 8
    x[0, 0, :4] = torch.tensor([0.0, 6.0, -0.5, 1.5], dtype=DT)  # the kinks
    x.requires_grad_(True)
    pr = PackedReLU(base)
    y1 = pr(x)
    y2 = base(x.clone())
    gy = torch.randn_like(y1)
    assert torch.equal(y1, y2)
    g2 = torch.autograd.grad(base(x * 1), x, gy)[0]
    assert torch.equal(torch.autograd.grad(y1, x, gy)[0], g2)
    assert measure_saved_bytes(lambda: pr(x), pr) == 14 == PackedReLU.saved_bytes(x.shape, DT)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_bits_round_trip(n):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(p, (n,)), m)
    if n == 8:
        assert torch.equal(pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)),
                           torch.tensor([129], dtype=torch.uint8))


def test_pack_bits_every_byte_and_an_unaligned_view():
    """All 256 bit patterns (the int64 multiply packs without carries for each), and a mask that
    is a view at an odd offset into a larger one."""
    byte = torch.arange(256)
    m = ((byte.unsqueeze(1) >> torch.arange(8)) & 1).bool()  # row k: the bits of k, bit 0 first
    assert torch.equal(pack_bits(m), byte.to(torch.uint8))
    big = torch.rand(1003, generator=torch.Generator().manual_seed(0)) > 0.5
    view = big[3:1003]  # storage offset 3
    assert torch.equal(unpack_bits(pack_bits(view), (1000,)), view)


def test_packed_relu_channels_last_keeps_the_layout_and_the_gradient():
    x = torch.randn(2, 16, 5, 7, dtype=DT).mul(4).contiguous(memory_format=torch.channels_last).requires_grad_()
    pr = PackedReLU(nn.ReLU6())
    gy = torch.randn(2, 16, 5, 7, dtype=DT).contiguous(memory_format=torch.channels_last)
    g = torch.autograd.grad(pr(x), x, gy)[0]
    assert torch.equal(g, torch.autograd.grad(F.relu6(x), x, gy)[0])
    assert g.is_contiguous(memory_format=torch.channels_last)
    assert measure_saved_bytes(lambda: pr(x), pr) == (2 * 16 * 5 * 7 + 7) // 8


@pytest.mark.parametrize("kind,name", CASES)
def test_frozen_layers_exact(kind, name):
    base, x, _ = make_case(kind, name)
    base.weight.requires_grad_(False)
    frozen = FrozenConv2d(base) if kind == "conv" else FrozenLinear(base)
    xg = x.clone().requires_grad_(True)
    y1, y2 = frozen(xg), base(xg)
    gy = torch.randn_like(y1)
    params = [xg] + ([base.bias] if base.bias is not None else [])
    for a, b in zip(torch.autograd.grad(y1, params, gy), torch.autograd.grad(y2, params, gy)):
        assert rel(a, b) <= 1e-12
    assert rel(y1, y2) <= 1e-14
    assert measure_saved_bytes(lambda: frozen(xg), frozen) == 0 == type(frozen).saved_bytes(x.shape, DT)


# ---------------------------------------------------------------- saved bytes

def measure_saved_bytes(fn, module) -> int:
    """Bytes of the unique non-parameter storages saved for backward while fn runs."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["asi", "hosvd"])
@pytest.mark.parametrize("kind,name", [("conv", "g1_3x3"), ("conv", "depthwise"), ("conv", "reflect"),
                                       ("conv", "same_even"), ("linear", "2d"), ("linear", "4d")])
def test_saved_bytes_equals_measurement(kind, name, method, dtype):
    base, x, low = make_case(kind, name, dtype=dtype)
    if method == "asi":
        low = list(low)
        low[-1] = 10**6  # one identity mode (not stored)
    layer = wrap(kind, method, base, low if method == "asi" else 0.7)
    xg = x.clone().requires_grad_(True)
    measured = measure_saved_bytes(lambda: layer(xg), layer)
    if method == "asi":
        predicted = layer.saved_bytes(x.shape, dtype)
    else:
        predicted = layer.saved_bytes(x.shape, dtype, ranks=hosvd_ranks(x, 0.7))
        assert predicted == layer.saved_bytes(x.shape, dtype)  # defaults to the last ranks
    assert measured == predicted > 0
    if method == "asi":
        assert measured < x.numel() * x.element_size()
        n = sum(s * min(r, s) for s, r in zip(x.shape, low) if r < s)
        assert layer.state_bytes(x.shape, dtype) == n * 4


def test_saved_bytes_formula_by_hand():
    layer = ASIConv2d(nn.Conv2d(16, 8, 3), [4, 8, 32, 5])
    # core 4*8*16*5 (H rank clips to 16 = identity), factors U0 32x4, U1 16x8, U3 20x5
    assert layer.saved_bytes((32, 16, 16, 20), torch.float32) == 4 * (4 * 8 * 16 * 5 + 32 * 4 + 16 * 8 + 20 * 5)
    assert layer.saved_bytes((32, 16, 16, 20), torch.bfloat16) == 2 * (4 * 8 * 16 * 5 + 32 * 4 + 16 * 8 + 20 * 5)
    with pytest.raises(ValueError, match="ranks"):
        HOSVDConv2d(nn.Conv2d(16, 8, 3), 0.8).saved_bytes((32, 16, 16, 20), torch.float32)


def test_hosvd_ranks_rule():
    # singular values 3, 2, 1 on mode 0: squared 9, 4, 1 -> eps 0.6 needs 1, 0.9 needs 2, 0.95 needs 3
    x = torch.zeros(3, 3, dtype=DT)
    x[0, 0], x[1, 1], x[2, 2] = 3, 2, 1
    assert hosvd_ranks(x, 0.6) == [1, 1]
    assert hosvd_ranks(x, 0.9) == [2, 2]
    assert hosvd_ranks(x, 0.95) == [3, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,name", [("conv", "g1_3x3"), ("conv", "grouped"), ("linear", "3d")])
def test_cuda_matches_cpu(kind, name):
    base, x, low = make_case(kind, name)
    cpu = grads(wrap(kind, "asi", base, low), base, x)
    gbase = copy.deepcopy(base).cuda()
    out = grads(wrap(kind, "asi", gbase, low), gbase, x.cuda())
    for a, b in zip(out, cpu):
        if b is not None:
            assert rel(a.cpu(), b) <= 1e-8


@pytest.mark.parametrize("kind,name", [("conv", "g1_3x3"), ("conv", "same_even_grouped"), ("linear", "4d")])
def test_expanded_grad_output_from_sum(kind, name):
    """y.sum().backward() hands the backward a zero-stride grad_output."""
    base, x, low = make_case(kind, name)
    layer = wrap(kind, "asi", base, low).record_factors()
    xg = x.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(layer(xg).sum(), [xg, base.weight])
    xr = tucker_reconstruct(*layer.last_factors())
    assert rel(gw, torch.autograd.grad(base(xr).sum(), base.weight)[0]) <= 1e-10
    assert rel(gx, torch.autograd.grad(base(xg).sum(), xg)[0]) <= 1e-12


def test_zero_input_gives_zero_weight_grad():
    base, x, low = make_case("conv", "g1_3x3")
    layer = ASIConv2d(base, low)
    out = grads(layer, base, torch.zeros_like(x))
    assert float(out[2].abs().max()) == 0.0 and torch.isfinite(out[1]).all()


def test_cold_start_iterations_make_the_first_step_accurate():
    """On a cold start the layer runs extra subspace iterations, so its very first gradient is
    taken in a subspace close to the dominant one rather than a nearly random one: on an input
    with a decaying spectrum the first-step gradient error drops well below the one-iteration
    figure."""
    torch.manual_seed(0)
    decay = [torch.logspace(0, -2, s, dtype=torch.float64) for s in (16, 24, 12, 12)]
    core = torch.randn(16, 24, 12, 12, dtype=torch.float64)
    for n, d in enumerate(decay):  # scale mode n's fibres: a smoothly decaying spectrum per mode
        core = core * d.view(*[-1 if k == n else 1 for k in range(4)])
    fs = [torch.linalg.qr(torch.randn(s, s, dtype=torch.float64))[0] for s in (16, 24, 12, 12)]
    x = tucker_reconstruct(core, fs)
    base = nn.Conv2d(24, 8, 3, padding=1).double()
    exact = torch.autograd.grad(base(x).pow(2).sum(), base.weight)[0]
    errs = {}
    for iters in (0, 2):
        layer = ASIConv2d(base, [6, 8, 5, 5], seed=1)
        layer.factorizer.cold_start_iters = iters
        g = torch.autograd.grad(layer(x).pow(2).sum(), base.weight)[0]
        errs[iters] = float((g - exact).norm() / exact.norm())
    assert errs[2] < 0.8 * errs[0], errs  # measured: 0.074 vs 0.099


# --- the one interface (ShortcutLayer / TuckerLayer) ----------------------------------------------
@pytest.mark.parametrize("make, base", [
    (lambda b: ASIConv2d(b, [2, 3, 4, 4]), nn.Conv2d(6, 8, 3)),
    (lambda b: HOSVDConv2d(b, 0.8), nn.Conv2d(6, 8, 3)),
    (lambda b: ASILinear(b, [2, 3]), nn.Linear(6, 4)),
    (lambda b: HOSVDLinear(b, 0.8), nn.Linear(6, 4)),
    (FrozenBatchNorm2d, nn.BatchNorm2d(6)),
    (PackedReLU, nn.ReLU6()),
    (FrozenConv2d, nn.Conv2d(6, 8, 3)),
    (FrozenLinear, nn.Linear(6, 4)),
])
def test_every_layer_is_a_shortcut_layer_around_its_base(make, base):
    from autorank.shortcut import ShortcutLayer, TuckerLayer

    layer = make(base)
    assert isinstance(layer, ShortcutLayer) and layer.get_base_layer() is base is layer.base_layer
    tucker = isinstance(layer, (ASIConv2d, ASILinear, HOSVDConv2d, HOSVDLinear))
    assert isinstance(layer, TuckerLayer) == tucker
    if not tucker:
        assert layer.state_bytes((2, 6, 5, 5)) == 0


def test_tucker_layers_say_which_ranks_an_input_gets():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=DT)
    asi, hosvd = ASIConv2d(nn.Conv2d(6, 8, 3), [2, 9, 4, 4]), HOSVDConv2d(nn.Conv2d(6, 8, 3), 0.7)
    assert not asi.needs_data and asi.ranks_for(x) == [2, 9, 4, 4]
    assert hosvd.needs_data and hosvd.ranks_for(x) == hosvd_ranks(x, 0.7)
    # 4*6*4*4 core + factors 4x2, 5x4, 5x4 (channels: rank 9 >= 6, kept whole) in fp64
    assert asi.saved_bytes(x.shape, DT) == 8 * (2 * 6 * 4 * 4 + 4 * 2 + 5 * 4 + 5 * 4)
    assert asi.state_bytes(x.shape, DT) == 8 * (4 * 2 + 5 * 4 + 5 * 4)
    assert hosvd.state_bytes(x.shape, DT) == 0
    assert asi.trains_weight and not asi.requires_grad_(False).trains_weight


# ---------------------------------------------------------------- channels-last steps

@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_mode_product_of_a_permuted_tensor_keeps_its_layout(n):
    from autorank.shortcut.tucker import mode_product, physical_order
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, 6, 5, 3, generator=g, dtype=DT)
    m = torch.randn(x.shape[n], 2, generator=g, dtype=DT)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert physical_order(xcl) == (0, 2, 3, 1) and physical_order(x) is None
    got = mode_product(xcl, m, n)
    assert rel(got, mode_product(x, m, n)) <= 1e-14
    # computed in memory order: the result is channels-last too (the channel mode at the back)
    assert got.permute(0, 2, 3, 1).is_contiguous()


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_channels_last_shortcut_conv_exact_and_keeps_the_layout(name):
    """A channels-last input is factorised in its memory order (no copy of x): the core and both
    gradients channels-last, grad_weight = the gradient on the reconstruction, grad_input exact.
    The modes are projected in another order than in the default layout (subspace iteration is
    sequential), so the factors differ; the approximation is as good."""
    base, x, low = make_case("conv", name)
    xcl = x.contiguous(memory_format=torch.channels_last)
    layers = [wrap("conv", "asi", base, low, seed=3).record_factors() for _ in range(2)]
    outs = [grads(layers[0], base, x), grads(layers[1], base, xcl)]
    (core0, f0), (core1, f1) = layers[0].last_factors(), layers[1].last_factors()
    assert core1.shape == core0.shape
    assert factor_shapes(f1) == factor_shapes(f0) == expected_factor_shapes("asi", x, low)
    e0, e1 = rel(tucker_reconstruct(core0, f0), x), rel(tucker_reconstruct(core1, f1), x)
    assert abs(e1 - e0) <= 0.1 * e0
    assert core1.permute(0, 2, 3, 1).is_contiguous()
    ref = grads(base, base, tucker_reconstruct(core1, f1).contiguous(memory_format=torch.channels_last))
    exact = grads(base, base, xcl)
    assert rel(outs[1][2], ref[2]) <= 1e-6
    assert rel(outs[1][1], exact[1]) <= 1e-12
    if ConvGeometry(base).native:  # (padded geometries return a crop or a pad's gradient)
        assert outs[1][1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_frozen_conv_grad_input_channels_last(name):
    base, x, _ = make_case("conv", name)
    base.weight.requires_grad_(False)
    xg = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = FrozenConv2d(base)(xg)
    gy = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, xg, gy)
    (want,) = torch.autograd.grad(base(xg), xg, gy)
    assert rel(got, want) <= 1e-12
    assert ConvGeometry(base).native == (name not in NON_NATIVE)
    if name not in NON_NATIVE:  # (the others return a crop or a pad's gradient)
        assert got.is_contiguous(memory_format=torch.channels_last)
