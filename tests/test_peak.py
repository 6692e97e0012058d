"""Peak training memory: the live measurement against hand counts, the prediction against it."""

import copy
import functools

import pytest
import torch
import torch.nn as nn

from autorank.cost import predict_peak_training_bytes
from autorank.cost.live import measure_peak_training
from autorank.plan import Choice, Plan, apply_plan, candidate_layers, finetune_mode

torchvision = pytest.importorskip("torchvision")


def test_live_measurement_of_a_linear_step_equals_hand_count():
    n, d, k = 32, 64, 16
    torch.manual_seed(0)
    model, x, y = nn.Linear(d, k), torch.randn(n, d), torch.randint(0, k, (n,))
    w, b, logits = 4 * k * d, 4 * k, 4 * n * k
    resident = (w + b) + (w + b) + 4 * n * d + 8 * n  # weights, momentum, x, int64 labels
    live = measure_peak_training(model, x, y)
    assert live.resident_bytes == resident
    # forward: logits, log_softmax (saved), the loss and nll's total_weight (scalars)
    assert live.forward_peak_bytes == resident + 2 * logits + 4 + 4
    # backward, at addmm's: grad of the logits, grad W, grad b, the loss and its ones_like seed
    assert live.backward_peak_bytes == resident + logits + w + b + 4 + 4
    # step: the gradients; SGD updates in place
    assert live.step_peak_bytes == resident + w + b
    assert live.peak_bytes == live.backward_peak_bytes
    # Adam on the CPU: two state tensors and a float32 step counter per parameter; the update's
    # sqrt(v) and its quotient (2 x W)
    adam = measure_peak_training(model, x, y, optimizer="adam")
    adam_resident = resident - (w + b) + 2 * (w + b) + 2 * 4
    assert adam.resident_bytes == adam_resident
    assert adam.step_peak_bytes == adam_resident + (w + b) + 2 * w
    # the model was measured on a copy
    assert model.weight.grad is None


def test_predicted_linear_step_equals_measured():
    x, y = torch.randn(32, 64), torch.randint(0, 16, (32,))
    model = nn.Linear(64, 16)
    for opt in ("sgd", "adam"):
        pred = predict_peak_training_bytes(model, x, optimizer=opt)
        live = measure_peak_training(model, x, y, optimizer=opt)
        assert (pred.forward_peak_bytes, pred.backward_peak_bytes, pred.step_peak_bytes) == (
            live.forward_peak_bytes, live.backward_peak_bytes, live.step_peak_bytes)


class Block(nn.Module):
    """A residual block: its input lives on (the skip) while the branch runs."""

    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.branch(x))


def small_resnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         Block(16), nn.MaxPool2d(2), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(16, 10))


MODELS = {
    "small_resnet": small_resnet,
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
}


def make_plan(model, kind):
    c = candidate_layers(model)
    return {
        "plain": None,
        "full_last4": Plan({n: Choice.full() for n in c[-4:]}, lean=False),
        "full_last4_lean": Plan({n: Choice.full() for n in c[-4:]}),
        "asi_last4_lean": Plan({n: Choice.asi([2, 8, 2, 2]) for n in c[-4:-1]} | {c[-1]: Choice.full()}),
        "asi_last4_bn_train": Plan({n: Choice.asi([2, 8, 2, 2]) for n in c[-4:-1]} | {c[-1]: Choice.asi([2, 4])},
                                   bn="train"),
        "full_first2": Plan({n: Choice.full() for n in c[:2]}, lean=False),
    }[kind]


@functools.cache
def _built(name):
    return MODELS[name]()


CASES = [(m, k, "sgd") for m in MODELS for k in ("plain", "full_last4", "full_last4_lean", "asi_last4_lean",
                                                  "full_first2")]
CASES += [("small_resnet", "asi_last4_bn_train", "sgd"), ("mobilenet_v2", "full_last4", "adam"),
          ("resnet18", "plain", "adamw"), ("resnet18", "asi_last4_lean", "adam")]


@pytest.mark.parametrize("model_name,kind,optimizer", CASES)
def test_predicted_peak_bounds_the_live_measurement(model_name, kind, optimizer):
    """Never below the real step's live bytes, at most 25% above (fine-tuning mode: dropout on,
    BN statistics frozen); each phase's prediction bounds its measurement."""
    model = finetune_mode(copy.deepcopy(_built(model_name)))
    size = 16 if model_name == "small_resnet" else 32
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    plan = make_plan(model, kind)
    pred = predict_peak_training_bytes(model, x, plan, optimizer=optimizer)
    if plan is not None:
        apply_plan(model, plan)
    live = measure_peak_training(model, x, y, optimizer=optimizer)
    assert live.peak_bytes <= pred.total_bytes <= 1.25 * live.peak_bytes, (pred, live)
    assert pred.forward_peak_bytes >= live.forward_peak_bytes
    assert pred.backward_peak_bytes >= live.backward_peak_bytes
    assert pred.step_peak_bytes >= live.step_peak_bytes


def test_frozen_prefix_forward_is_counted():
    """The plan trains the last layers only: the forward through the frozen prefix (no graph,
    but each op's input and output coexist) sets the peak, far above the trained region's."""
    model = copy.deepcopy(_built("resnet18")).eval()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    plan = make_plan(model, "full_last4_lean")
    pred = predict_peak_training_bytes(model, x, plan)
    live = measure_peak_training(apply_plan(model, plan), x, y)
    resident = pred.weights_bytes + pred.optimizer_bytes + pred.batch_bytes
    conv1_out = 4 * 64 * 32 * 32 * 4  # (4, 64, 32, 32): conv1's output and bn1's coexist
    assert pred.forward_peak_bytes >= resident + 2 * conv1_out
    assert pred.forward_peak_bytes == live.forward_peak_bytes
    assert pred.activation_bytes < conv1_out / 4  # the saved tensors are small next to it
    # the peak: backward, at the largest gradients, as measured; the total is the sum of the
    # parts, gradients and saved activations counted together (slightly above)
    assert pred.backward_peak_bytes == live.backward_peak_bytes == live.peak_bytes
    assert live.peak_bytes <= pred.total_bytes <= 1.01 * live.peak_bytes
