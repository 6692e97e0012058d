"""scripts/measure_fidelity.py's plan names: conv<k> and asi<eps>[b]@conv<k> train the last k
convolutions (plainly or with ASI) and the head, and report the compressed inputs' bytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autorank.models import mcunet_like, replace_head
from autorank.plan import candidate_layers, finetune_mode


@pytest.fixture(scope="module")
def mf(load_script):
    return load_script("measure_fidelity")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return finetune_mode(replace_head(mcunet_like(num_classes=5, width_mult=0.5), 5, seed=0), True)


def test_last_k_convs_plainly_and_with_asi(mf, model):
    x = torch.randn(8, 3, 48, 48)
    layers = candidate_layers(model)
    convs = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)]
    plans = mf.build_plans(model, ["conv2", "asi0.9@conv2", "asi0.9b@conv3"], x)
    inputs = mf.layer_inputs(model, convs[-3:], x)
    plain, _ = plans["conv2"]
    assert set(plain.layers) == {*convs[-2:], layers[-1]} and {c.kind for c in plain.layers.values()} == {"full"}
    assert plans["conv2"][1]["asi_input_bytes"] == sum(4 * math.prod(inputs[n].shape) for n in convs[-2:])
    asi, info = plans["asi0.9@conv2"]
    assert [asi.layers[n].kind for n in convs[-2:]] == ["asi", "asi"] and asi.layers[layers[-1]].kind == "full"
    assert info["asi_input_bytes"] == plans["conv2"][1]["asi_input_bytes"]
    assert 0 < info["asi_saved_bytes"] < info["asi_input_bytes"]
    b, info_b = plans["asi0.9b@conv3"]
    assert all(b.layers[n].ranks[0] == 8 for n in convs[-3:])  # the batch mode kept whole
    assert set(info_b["ranks"]) == set(convs[-3:])


def test_an_unknown_plan_name_says_what_is_allowed(mf, model):
    with pytest.raises(SystemExit, match="asi<eps>\\[b\\]@conv<k>"):
        mf.build_plans(model, ["conv"], torch.randn(2, 3, 32, 32))
