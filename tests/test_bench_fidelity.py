"""`autorank-bench fidelity`'s plan names: plain regions, and REGION=KEY with a search key of the
default space (full, asi@<eps>, asi@<eps>:b) on the region's leading part, the rest plainly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autorank.bench import fidelity as mf
from autorank.models import mcunet_like, replace_head
from autorank.plan import candidate_layers, finetune_mode
from autorank.shortcut import hosvd_ranks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return finetune_mode(replace_head(mcunet_like(num_classes=5, width_mult=0.5), 5, seed=0), True)


def test_last_k_convs_plainly_and_with_asi(model):
    x = torch.randn(8, 3, 48, 48)
    layers = candidate_layers(model)
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    plans = mf.build_plans(model, ["conv2", "conv2=asi@0.9", "conv3=asi@0.9:b", "conv2=full"], x)
    inputs = mf.layer_inputs(model, convs[-3:], x)
    plain, _ = plans["conv2"]
    assert set(plain.layers) == {*convs[-2:], layers[-1]} and {c.kind for c in plain.layers.values()} == {"full"}
    assert plans["conv2"][1]["asi_input_bytes"] == sum(4 * math.prod(inputs[n].shape) for n in convs[-2:])
    assert plans["conv2=full"][0].layers == plain.layers
    assert plans["conv2=full"][1] == plans["conv2"][1]
    asi, info = plans["conv2=asi@0.9"]
    assert [asi.layers[n].kind for n in convs[-2:]] == ["asi", "asi"] and asi.layers[layers[-1]].kind == "full"
    assert [list(asi.layers[n].ranks) for n in convs[-2:]] == [hosvd_ranks(inputs[n], 0.9) for n in convs[-2:]]
    assert info["asi_input_bytes"] == plans["conv2"][1]["asi_input_bytes"]
    assert 0 < info["asi_saved_bytes"] < info["asi_input_bytes"]
    b, info_b = plans["conv3=asi@0.9:b"]
    assert all(b.layers[n].ranks[0] == 8 for n in convs[-3:])  # the batch mode kept whole
    assert set(info_b["ranks"]) == set(convs[-3:])


def test_first_k_and_f8l4_with_a_key(model):
    x = torch.randn(4, 3, 32, 32)
    layers = candidate_layers(model)
    plans = mf.build_plans(model, ["first2=asi@0.8:b", "f8l4=asi@0.95", "f8l4", "from3"], x)
    first2, _ = plans["first2=asi@0.8:b"]
    assert list(first2.layers) == layers  # a contiguous region: the first 2 with ASI, every later plainly
    assert [c.kind for c in first2.layers.values()] == ["asi"] * 2 + ["full"] * (len(layers) - 2)
    assert all(first2.layers[n].ranks[0] == 4 for n in layers[:2])
    f8l4, info = plans["f8l4=asi@0.95"]
    assert set(f8l4.layers) == set(plans["f8l4"][0].layers) == {*layers[:8], *layers[-4:]}
    assert [f8l4.layers[n].kind for n in layers[:8]] == ["asi"] * 8
    assert [f8l4.layers[n].kind for n in layers[-4:]] == ["full"] * 4
    assert info["asi_input_bytes"] == plans["f8l4"][1]["asi_input_bytes"]
    assert list(plans["from3"][0].layers) == layers[3:]


@pytest.mark.parametrize("name", ["conv", "asi0.9b@conv2", "asi@0.9", "conv2=asi@", "last2=asi@0.9", "conv2=lora"])
def test_an_unknown_plan_name_says_what_is_allowed(model, name):
    with pytest.raises(SystemExit, match=rf"unknown plan '{name}': use head, .*REGION=KEY"):
        mf.build_plans(model, [name], torch.randn(2, 3, 32, 32))
