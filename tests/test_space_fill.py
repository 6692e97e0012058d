"""`fill: full` spaces: every non-candidate conv/linear layer after a plan's first trained layer
trains plainly (a contiguous trained region), with its peak predicted exactly."""

import copy

import pytest
import torch
from torch import nn

from autorank.cost import measure_saved_bytes, predict_peak_training_bytes, predict_saved_bytes
from autorank.cost.live import measure_peak_training
from autorank.errors import ConfigError
from autorank.plan import Choice, apply_plan, candidate_layers
from autorank.search.profile import Profile, profile_layers
from autorank.search.space import SearchSpace, load_space

B = 8


def deep_cnn():
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.fixture(scope="module")
def profiles():
    model = deep_cnn().eval()
    torch.manual_seed(1)
    batches = [(torch.randn(B, 3, 8, 8), torch.randint(0, 4, (B,)))]
    out = {}
    for fill in ("frozen", "full"):  # candidates: conv 0, conv 2 and the head; convs 4-10 are not
        space = SearchSpace(name="t", first=2, last=1, levels=(0.9,), fill=fill)
        out[fill] = profile_layers(model, batches, space, progress=False)
    return model, out


def test_fill_full_trains_every_layer_after_the_first_trained_one(profiles):
    model, prof = profiles
    names = candidate_layers(model)
    assert prof["full"].layer_names == ["0", "2", "12"] and prof["full"].order == names
    assert prof["frozen"].order == []
    plan = prof["full"].to_plan({"2": "asi@0.9", "12": "full"})
    assert list(plan.layers) == names[1:]  # conv 2 on, in forward order; conv 0 stays frozen
    assert plan.layers["2"].kind == "asi" and all(plan.layers[n] == Choice.full() for n in names[2:])
    head_only = prof["full"].to_plan({"12": "full"})
    assert list(head_only.layers) == ["12"]  # nothing before the head trains: nothing is filled
    assert list(prof["frozen"].to_plan({"2": "asi@0.9", "12": "full"}).layers) == ["2", "12"]
    # a frozen candidate inside the region stays frozen (it passes gradients on)
    assert "2" not in prof["full"].to_plan({"0": "full", "2": "frozen", "12": "full"}).layers


def test_fill_full_plan_bytes_are_predicted(profiles):
    """Saved bytes exactly; the peak bounds the live measurement and grows with the region."""
    model, prof = profiles
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 4, (B,))
    peaks = {}
    for fill in ("frozen", "full"):
        plan = prof[fill].to_plan({"0": "asi@0.9", "12": "full"})
        saved = predict_saved_bytes(model, x, plan)
        m = apply_plan(copy.deepcopy(model), plan)
        assert saved.activation_bytes == measure_saved_bytes(lambda: m(x), m).activation_bytes > 0
        pred = predict_peak_training_bytes(model, x, plan)
        live = measure_peak_training(apply_plan(copy.deepcopy(model), plan), x, y)
        assert live.peak_bytes <= pred.total_bytes <= 1.25 * live.peak_bytes
        peaks[fill] = pred.total_bytes
    assert peaks["full"] > peaks["frozen"]  # the filled region saves the inputs of convs 2-10


def test_fill_changes_the_space_key_and_is_checked():
    assert SearchSpace(name="t", fill="full").sha256 != SearchSpace(name="t").sha256
    with pytest.raises(ConfigError, match="fill"):
        SearchSpace(name="t", fill="half")
    assert load_space("default").fill == "full" and load_space("last4").fill == "frozen"


def test_profile_json_round_trip_keeps_the_order(profiles):
    _, prof = profiles
    again = Profile.from_json(prof["full"].to_json())
    assert again.order == prof["full"].order
    assert again.to_plan({"2": "full", "12": "full"}).layers == prof["full"].to_plan({"2": "full", "12": "full"}).layers
