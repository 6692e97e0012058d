"""Cost model: measured == predicted saved bytes to the byte, FLOPs == hand formulas, peak parts."""

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn

from autorank.cost import (measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes, qr_flops,
                           train_step_flops)
from autorank.plan import Choice, Plan, apply_plan, candidate_layers

torchvision = pytest.importorskip("torchvision")


# -- an MCUNet-like network: inverted residual blocks with ReLU6 ----------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, k=3):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mcunet_like(num_classes=10):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)),
        InvertedResidual(16, 16, 1, 3), InvertedResidual(16, 24, 2, 4, k=5), InvertedResidual(24, 24, 1, 4),
        InvertedResidual(24, 40, 2, 6, k=7), InvertedResidual(40, 40, 1, 5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(40, num_classes),
    )


MODELS = {
    "mcunet_like": mcunet_like,
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
}


def make_plan(model, kind):
    """plain: no plan (everything trains); full/asi/hosvd: the last 4 layers, lean or not."""
    c = candidate_layers(model)
    last = c[-4:]
    if kind == "full_last4":
        return Plan({n: Choice.full() for n in last}, lean=False)
    if kind == "full_last4_lean":
        return Plan({n: Choice.full() for n in last}, lean=True)
    if kind == "asi_last4":
        return Plan({n: Choice.asi([1, 8, 2, 2]) for n in last[:-1]} | {last[-1]: Choice.full()}, lean=False)
    if kind == "asi_last4_lean_bn_train":
        return Plan({n: Choice.asi([2, 8, 2, 2]) for n in last[:-1]} | {last[-1]: Choice.asi([2, 4])},
                    lean=True, bn="train")
    if kind == "hosvd_last4_lean":
        return Plan({n: Choice.hosvd(0.8) for n in last[:-1]} | {last[-1]: Choice.full()}, lean=True)
    assert kind == "plain"
    return None


ALL = [("plain", "train"), ("plain", "eval"), ("full_last4", "eval"), ("full_last4_lean", "eval"),
       ("asi_last4", "eval"), ("asi_last4_lean_bn_train", "train"), ("hosvd_last4_lean", "eval")]
SOME = [("plain", "train"), ("full_last4", "eval"), ("full_last4_lean", "eval"), ("asi_last4_lean_bn_train", "train")]
CASES = [("mcunet_like", k, mode) for k, mode in ALL] + [(m, k, mode) for m in ("mobilenet_v2", "resnet18")
                                                         for k, mode in SOME]


@functools.cache
def _built(name):
    return MODELS[name]()


@pytest.mark.parametrize("model_name,kind,mode", CASES)
def test_predicted_saved_bytes_equal_measured(model_name, kind, mode):
    model = copy.deepcopy(_built(model_name)).train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    plan = make_plan(model, kind)
    predicted = predict_saved_bytes(model, x, plan)
    # the prediction ran on a copy: BN statistics untouched even in train mode
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), _built(model_name).buffers()))
    if plan is not None:
        apply_plan(model, plan)
    measured = measure_saved_bytes(lambda: model(x), model)
    assert measure_saved_bytes(lambda: model(x)) == measured  # modules that run are seen without `model`
    assert predicted.unknown_ops == []
    assert predicted.activation_bytes == measured.activation_bytes
    assert sum(predicted.per_module.values()) == predicted.activation_bytes
    assert 0 < predicted.conv_input_bytes <= predicted.activation_bytes
    assert predicted.input_saved == (plan is None)  # plain training saves the batch itself


def test_lean_saves_less_and_conv_inputs_are_the_paper_figure():
    model = mcunet_like().eval()
    x = torch.randn(2, 3, 64, 64)
    plain = predict_saved_bytes(model, x, make_plan(model, "full_last4"))
    lean = predict_saved_bytes(model, x, make_plan(model, "full_last4_lean"))
    # same trained convs: the paper's figure does not change, the real total drops
    assert plain.conv_input_bytes == lean.conv_input_bytes
    assert lean.activation_bytes < plain.activation_bytes
    # lean + BN frozen: trained conv inputs + 1-bit masks + nothing else. Last 4 layers: block 5's
    # three convs (input (2,40,8,8), mid 200 ch at 8x8) and the linear (2, 40).
    e = 4
    conv_in = e * (2 * 40 * 64 + 2 * 200 * 64 + 2 * 200 * 64 + 2 * 40)
    masks = 2 * math.ceil(2 * 200 * 64 / 8)  # the block's two ReLU6
    dropout_mask = 0  # eval mode
    assert lean.conv_input_bytes == conv_in
    assert lean.activation_bytes == conv_in + masks + dropout_mask


def test_measure_counts_storage_once_and_parameters_apart():
    w = nn.Parameter(torch.randn(8, 8))
    big = torch.randn(100, 8, requires_grad=True)

    def fn():
        v = big[:4]  # a view: keeps all of `big` alive
        return (v @ w).sum() + (v * v).sum()  # v saved three times, w once

    m = measure_saved_bytes(fn)
    assert m.activation_bytes == 100 * 8 * 4
    assert m.parameter_bytes == 8 * 8 * 4
    assert m.n_storages == 2 and m.n_tensors == 4
    assert m.by_dtype == {"float32": 3200}


def test_depthwise_conv_step_flops_equal_hand_formula():
    b, c, h, w, k = 2, 96, 8, 8, 3
    conv = nn.Conv2d(c, c, k, padding=1, groups=c, bias=False)
    fwd = 2 * b * h * w * c * k * k  # one multiply-add per kernel tap and output element
    x = torch.randn(b, c, h, w)
    assert train_step_flops(conv, x) == 2 * fwd  # forward + grad_weight
    assert train_step_flops(conv, x.requires_grad_()) == 3 * fwd  # + grad_input


def test_asi_linear_step_flops_equal_hand_formula():
    n, d, o, r0, r1 = 32, 64, 16, 4, 8
    model = nn.Sequential(nn.Linear(d, o))
    flops = train_step_flops(model, torch.randn(n, d), Plan({"0": Choice.asi([r0, r1])}))
    forward = 2 * n * d * o
    # per mode (size s, rank r, rest P): X^T U, X (X^T U), project: 3 GEMMs of 2 s r P, + QR of s x r
    mode0 = 3 * 2 * n * r0 * d + qr_flops(n, r0)
    mode1 = 3 * 2 * d * r1 * r0 + qr_flops(d, r1)  # on the already projected (r0, d) tensor
    # grad_weight from (core, U0, U1): U0^T gy, (.)^T core, (.) U1^T
    backward = 2 * r0 * n * o + 2 * o * r0 * r1 + 2 * o * r1 * d
    assert flops == forward + mode0 + mode1 + backward
    assert qr_flops(n, r0, with_q=False) == 2 * n * r0**2 - 2 * r0**3 // 3  # Householder R
    assert abs(qr_flops(n, r0) - 2 * qr_flops(n, r0, with_q=False)) <= 1  # + forming the thin Q


def test_peak_parts():
    model = mcunet_like().eval()
    x = torch.zeros(4, 3, 64, 64)
    plan = make_plan(model, "asi_last4")
    sgd = predict_peak_training_bytes(model, x, plan)
    trained_bytes = 4 * sum(p.numel() for n, p in model.named_parameters()
                            if n.split(".weight")[0].split(".bias")[0] in plan.layers)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    weights = 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()
                                                                     if b.dtype == torch.float32)) + 8 * n_bn
    assert sgd.weights_bytes == weights  # + one int64 num_batches_tracked per BN
    assert sgd.grads_bytes == trained_bytes and sgd.optimizer_bytes == trained_bytes
    assert predict_peak_training_bytes(model, x, plan, momentum=0).optimizer_bytes == 0
    n_trained = sum(p.requires_grad for p in apply_plan(copy.deepcopy(model), plan).parameters())
    adam = predict_peak_training_bytes(model, x, plan, optimizer="adam")
    assert adam.optimizer_bytes == 2 * trained_bytes + 4 * n_trained  # + a float32 step counter each
    assert sgd.activation_bytes == predict_saved_bytes(model, x, plan).activation_bytes
    assert sgd.batch_bytes == x.numel() * 4 + 4 * 8
    asi = [n for n, c in plan.layers.items() if c.kind == "asi"]
    assert sgd.state_bytes > 0 and len(asi) == 3
    assert sgd.total_bytes == (sgd.weights_bytes + sgd.grads_bytes + sgd.optimizer_bytes + sgd.activation_bytes
                               + sgd.batch_bytes + sgd.transient_bytes + sgd.state_bytes)
    plain = predict_peak_training_bytes(model, x)
    assert plain.batch_bytes == 4 * 8  # the input is saved by the first conv: in activations
    assert plain.total_bytes > sgd.total_bytes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_prediction_bounds_cuda_measurement():
    from autorank.bench.peak import check_cuda

    for row in check_cuda(batch=8, size=64):
        # The model part, as on the CPU (tests/test_peak.py): never below the step's live tensor
        # bytes, at most 25% above. cuDNN's workspace is NOT modelled (it depends on the algorithm
        # cuDNN picks): torch.cuda.max_memory_allocated (row["measured_bytes"]) may exceed the
        # prediction by it; `autorank-bench peak --device cuda` prints it beside the no-cuDNN figure.
        assert row["tensor_bytes"] <= row["predicted_bytes"] <= 1.25 * row["tensor_bytes"], row
        assert row["predicted_saved"] == row["measured_saved"], row


# -- the meta-device fast path gives what real tensors give -----------------------------------------
def _real(fn, model, x, plan):
    """fn traced on real tensors (the meta shadow off)."""
    from autorank.cost.meta import real_tensors_only

    with real_tensors_only():
        return fn(model, x, plan)


@pytest.mark.parametrize("model_name,kind,mode", [("mcunet_like", k, m) for k, m in ALL if not k.startswith("hosvd")]
                         + [("mobilenet_v2", "asi_last4_lean_bn_train", "train")])
def test_meta_fast_path_equals_real_tensors(model_name, kind, mode):
    from autorank.cost import meta

    model = copy.deepcopy(_built(model_name)).train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    plan = make_plan(model, kind)
    before = sum(meta.FALLBACKS.values())
    for _ in range(2):  # the second call reuses the cached shadow
        fast_peak, fast_flops = predict_peak_training_bytes(model, x, plan), train_step_flops(model, x, plan)
        fast_saved = predict_saved_bytes(model, x, plan)
    assert sum(meta.FALLBACKS.values()) == before  # no real-tensor fallback was taken
    assert fast_peak == _real(predict_peak_training_bytes, model, x, plan)
    assert fast_flops == _real(train_step_flops, model, x, plan)
    assert fast_saved == _real(predict_saved_bytes, model, x, plan)
    # the model itself is untouched: same modules, no plan, no gradients
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _built(model_name).state_dict().values()))
    assert all(p.grad is None for p in model.parameters())


def test_meta_shadow_follows_model_changes_and_plans_already_applied():
    model = mcunet_like().eval()
    x = torch.randn(2, 3, 32, 32)
    plan = make_plan(model, "asi_last4")
    first = predict_peak_training_bytes(model, x, plan)
    model.train()  # a changed mode (or module, or requires_grad) rebuilds the shadow
    assert predict_peak_training_bytes(model, x, plan) == _real(predict_peak_training_bytes, model, x, plan)
    model.eval()
    apply_plan(model, plan)  # plan=None: the model as it is, plan included
    assert predict_peak_training_bytes(model, x) == first
    assert train_step_flops(model, x) == _real(train_step_flops, model, x, None)
    other = make_plan(model, "full_last4")  # replaces the applied plan on the copy only
    assert predict_peak_training_bytes(model, x, other) == _real(predict_peak_training_bytes, model, x, other)
    assert predict_peak_training_bytes(model, x) == first


def test_hosvd_plans_fall_back_to_real_tensors():
    from autorank.cost import meta

    model = mcunet_like().eval()
    x = torch.randn(2, 3, 32, 32)
    plan = make_plan(model, "hosvd_last4_lean")
    before = meta.FALLBACKS["needs data"]
    flops = train_step_flops(model, x, plan)
    assert meta.FALLBACKS["needs data"] == before + 1
    assert flops == _real(train_step_flops, model, x, plan)


# -- the cost model knows autorank's layers by their interface, and hides no bug -------------------
class _ScaleByMax(nn.Module):
    """Reads a value in its forward (x.max()): cannot run on the meta device."""

    def forward(self, x):
        return x * float(x.detach().abs().max() > 0)


def test_a_module_that_reads_values_is_traced_on_real_tensors():
    from autorank.cost import meta

    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaleByMax(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    before = sum(meta.FALLBACKS.values())
    predicted = predict_saved_bytes(model, x)
    assert sum(meta.FALLBACKS.values()) == before + 1
    assert predicted.activation_bytes == measure_saved_bytes(lambda: model(x), model).activation_bytes


def test_a_bug_in_a_layer_is_raised_not_hidden_behind_a_fallback():
    from autorank.cost import meta
    from autorank.shortcut import ShortcutLayer

    class Broken(ShortcutLayer):  # a rename left behind: saved_bytes reads a missing attribute
        def forward(self, x):
            return self.base_layer(x)

        def saved_bytes(self, input_shape, dtype=torch.float32):
            return self.mask_bytes_per_element * math.prod(input_shape)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Broken(nn.ReLU()))
    before = sum(meta.FALLBACKS.values())
    with pytest.raises(AttributeError, match="mask_bytes_per_element"):
        predict_peak_training_bytes(model, torch.randn(2, 3, 8, 8))
    assert sum(meta.FALLBACKS.values()) == before


def test_only_shortcut_layers_are_opaque():
    """A module that merely looks like a shortcut layer (a `saved_bytes` method, a `factorizer`)
    is traced op by op: its claim of 0 bytes is not taken."""

    class LooksLikeOne(nn.Module):
        factorizer = None

        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(8, 2)

        def forward(self, x):
            return self.base_layer(x)

        def saved_bytes(self, input_shape, dtype=torch.float32):
            return 0

    model = nn.Sequential(nn.Linear(8, 8), LooksLikeOne())
    x = torch.randn(4, 8)
    predicted = predict_saved_bytes(model, x)
    assert predicted.activation_bytes == measure_saved_bytes(lambda: model(x), model).activation_bytes == 2 * 4 * 8 * 4
    assert predicted.per_module["1.base_layer"] == 4 * 8 * 4  # its Linear's input, traced
