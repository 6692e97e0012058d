"""keep_batch ASI choices (asi@<level>:b) and the head rule, on a small real model."""

import copy

import pytest
import torch
from torch import nn

from autorank.cost import measure_saved_bytes, predict_saved_bytes
from autorank.errors import ConfigError
from autorank.plan import apply_plan
from autorank.search.profile import profile_layers
from autorank.search.space import SearchSpace, keeps_batch, load_space, parse_choice_key

B = 8


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_choice_keys_variants_and_head_rule():
    sp = SearchSpace(name="t", last=3, levels=(0.8, 0.9), variants=("all", "keep_batch"))
    assert sp.layer_choices("x") == ["frozen", "full", "asi@0.8", "asi@0.8:b", "asi@0.9", "asi@0.9:b"]
    assert sp.layer_choices("x", head=True) == ["full"]
    free = SearchSpace(name="t", last=3, levels=(0.9,), head="search")
    assert free.layer_choices("x", head=True) == ["frozen", "full", "asi@0.9"]
    assert parse_choice_key("asi@0.9:b") == ("asi", 0.9) and keeps_batch("asi@0.9:b")
    assert not keeps_batch("asi@0.9")
    with pytest.raises(ConfigError):
        SearchSpace(name="t", variants=("diagonal",))
    with pytest.raises(ConfigError):
        SearchSpace(name="t", hparams={"lr": {"low": 0.1}})


def test_default_space_drops_rank_one_levels_and_searches_lr():
    sp = load_space("default")
    assert 0.4 not in sp.levels and min(sp.levels) >= 0.8
    assert set(sp.variants) == {"all", "keep_batch"} and sp.head == "full"
    assert sp.hparams["lr"] == {"low": 0.001, "high": 0.008, "log": True}
    assert sp.hparam_defaults({"lr": 0.003}) == {"lr": 0.003} and sp.hparam_defaults({"lr": 0.1}) == {"lr": 0.008}


def test_a_space_sets_its_own_warm_start_lr():
    llm = load_space("llm")  # the trainer's 0.003 is far below the language model's range
    assert llm.hparams["lr"]["default"] == 0.1 and llm.hparam_defaults({"lr": 0.003}) == {"lr": 0.1}
    with pytest.raises(ConfigError, match="outside"):
        SearchSpace(name="t", hparams={"lr": {"low": 0.01, "high": 0.1, "default": 0.5}})


def test_keep_batch_ranks_keep_the_batch_and_bytes_are_predicted_exactly():
    model = small_cnn().eval()
    torch.manual_seed(1)
    batches = [(torch.randn(B, 3, 8, 8), torch.randint(0, 4, (B,))) for _ in range(2)]
    space = SearchSpace(name="t", last=4, levels=(0.5, 0.9), variants=("all", "keep_batch"))
    prof = profile_layers(model, batches, space, progress=False)
    head = prof.layers[-1]
    assert head.name == "8" and head.choices == ["full"] and head.sensitivity == {"full": 0.0}
    for lp in prof.layers[:-1]:
        for lv in ("0.5", "0.9"):
            r, rb = lp.ranks[f"asi@{lv}"], lp.ranks[f"asi@{lv}:b"]
            assert rb[0] == B and rb[1:] == r[1:]
        assert r[0] < B  # the all-modes variant does compress the batch here
        assert set(lp.sensitivity) == set(lp.choices) and lp.sensitivity["asi@0.9:b"] > 0
    x = batches[0][0]
    for key in ("asi@0.5", "asi@0.9:b"):
        choices = {n: key for n in prof.layer_names[:-1]}
        plan = prof.to_plan(choices)
        predicted = predict_saved_bytes(model, x, plan)
        m = apply_plan(copy.deepcopy(model), plan)
        measured = measure_saved_bytes(lambda: m(x), m)
        assert predicted.activation_bytes == measured.activation_bytes > 0
