"""Recomputation in the search: the space offers blocks, the profile lists them, plans recompute
them, the knapsack knows what they cost, the budget curve shows what they buy."""

from types import SimpleNamespace

import pytest
import torch

from autorank.errors import ConfigError
from autorank.models import mcunet_like
from autorank.plan import Choice, finetune_mode
from autorank.search.budget import budget_curve, is_exact, is_plain
from autorank.search.cost import PlanCost
from autorank.search.knapsack import knapsack
from autorank.search.profile import profile_layers
from autorank.search.space import SearchSpace, load_space

SPACE = {"name": "rc", "first": 6, "last": 2, "choices": ["frozen", "full", "asi"], "levels": [0.9], "fill": "full",
         "recompute": "blocks"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return finetune_mode(mcunet_like(num_classes=10))


def test_the_space_offers_blocks(model):
    space = SearchSpace.from_dict(SPACE)
    cands = space.resolve(model)
    blocks = space.recompute_blocks(model)
    assert blocks and all(any(c.startswith(b + ".") for c in cands) for b in blocks)
    assert all(b.startswith("features.") and b.count(".") == 1 for b in blocks)
    named = SearchSpace.from_dict(SPACE | {"recompute": ["features.13", "features.12"]})
    assert named.recompute_blocks(model) == ["features.12", "features.13"]
    assert named.to_dict()["recompute"] == ["features.13", "features.12"]
    with pytest.raises(ConfigError, match="no blocks of the model"):
        SearchSpace.from_dict(SPACE | {"recompute": ["features.13.conv.0.0"]}).recompute_blocks(model)
    with pytest.raises(ConfigError, match="recompute: 'all'` is not allowed"):
        SearchSpace.from_dict(SPACE | {"recompute": "all"})
    # a space without the option keeps its dict (and sha: cached profiles and studies)
    assert "recompute" not in SearchSpace.from_dict({k: v for k, v in SPACE.items() if k != "recompute"}).to_dict()
    assert load_space("default").recompute == "blocks"


def test_profile_plan_knapsack_and_curve(model):
    space = SearchSpace.from_dict(SPACE)
    x = torch.randn(4, 3, 64, 64)
    batches = [(x, torch.randint(0, 10, (4,)))]
    prof = profile_layers(model, batches, space, progress=False)
    cost = PlanCost(model, x, prof)
    from autorank.search.profile import fill_peak_bytes

    fill_peak_bytes(prof, cost.peak)
    blocks = [lp.name for lp in prof.layers if lp.kind == "block"]
    assert blocks == space.recompute_blocks(model)
    assert prof.layers[0].kind != "block"  # the region starts at a layer
    assert all(prof.layer(b).sensitivity == {"frozen": 0.0, "recompute": 0.0} for b in blocks)

    layers = [lp.name for lp in prof.layers if lp.kind != "block"]
    assert (prof.candidate_names, prof.block_names) == (layers, blocks)
    # the references the study refits: valid plans, blocks kept (plain training, exact)
    from autorank.search.refit import HEAD_ALONE, PLAIN_REFERENCE, reference_choices

    refs = reference_choices(prof)
    assert refs[PLAIN_REFERENCE] == {n: "full" for n in layers} | {b: "frozen" for b in blocks}
    assert refs[HEAD_ALONE] == {n: "frozen" for n in layers[:-1]} | {layers[-1]: "full"} | {b: "frozen" for b in blocks}
    assert cost.peak(refs[HEAD_ALONE]).total_bytes < cost.peak(refs[PLAIN_REFERENCE]).total_bytes
    plain = {n: "full" for n in layers}
    recomputed = plain | {b: "recompute" for b in blocks}
    plan = prof.to_plan(recomputed)
    assert all(plan.layers[b] == Choice.recompute() for b in blocks)
    assert all(plan.layers[n] == Choice.full() for n in layers)
    plain_peak, rc_peak = cost.peak(plain).total_bytes, cost.peak(recomputed).total_bytes
    assert rc_peak < plain_peak
    assert cost.flops(recomputed) > cost.flops(plain)  # the recomputed forward

    # at a budget that plain training of these layers misses, recomputing blocks lets the
    # knapsack train more exactly (lower summed sensitivity) than without them, within budget
    import copy

    res = knapsack(prof, rc_peak, cost.peak)
    without = copy.deepcopy(prof)
    without.layers = [lp for lp in without.layers if lp.kind != "block"]
    res_plain = knapsack(without, rc_peak, cost.peak)
    assert res.predicted_peak_bytes <= rc_peak and res_plain.predicted_peak_bytes <= rc_peak
    assert any(res.choices[b] == "recompute" for b in blocks)
    assert res.sensitivity < res_plain.sensitivity

    # the warm starts: every plan says what each block does; the deepest plain plan that fits
    # comes with its blocks recomputed too (deeper: all layers, which plain training misses)
    from autorank.search.warmstart import warm_start_plans

    plans = dict(warm_start_plans(prof, rc_peak, cost))
    assert all(set(ch) == set(prof.layer_names) for ch in plans.values())
    assert plans["full every candidate"] == plain | {b: "frozen" for b in blocks}
    deep = [src for src in plans if src.endswith("blocks recomputed")]
    assert len(deep) == 1 and all(plans[deep[0]][b] == "recompute" for b in blocks)
    k_rc = int(deep[0].split()[2].rstrip(","))
    k_plain = max((int(src.split()[2]) for src in plans if src.startswith("full last") and src not in deep),
                  default=0)
    assert k_rc > k_plain and cost.peak(plans[deep[0]]).total_bytes <= rc_peak
    # with an lr probe, that plan once more at the top lr, right after it (the rest unchanged)
    probed = warm_start_plans(prof, rc_peak, cost, {"lr": 0.008})
    srcs = [s for s, _ in probed]
    i = srcs.index(deep[0])
    assert srcs[i + 1] == f"{deep[0]}, lr 0.008" and probed[i + 1][1] == plans[deep[0]] | {"lr": 0.008}
    assert [s for s in srcs if s != srcs[i + 1]] == list(plans)

    # the refit takes the best exact trial too (plain with blocks recomputed), beside the front's
    # best by proxy and the best plain-only one
    from autorank.search.records import TrialRecord
    from autorank.search.refit import refit_candidates

    def rec(n, acc, ch, front):
        return TrialRecord(number=n, state="complete", choices=ch, val_accuracy=acc, predicted_peak_bytes=n + 1,
                           on_front=front)
    asi = plain | {layers[0]: "asi@0.9"}
    trials = [rec(0, 0.9, asi, True), rec(1, 0.5, plain, False), rec(2, 0.7, recomputed, False),
              rec(3, 0.6, recomputed, False), rec(4, 0.8, asi | {layers[1]: "asi@0.9"}, True)]
    assert [r.number for r in refit_candidates(trials, 1)] == [0, 1, 2]
    assert [r.number for r in refit_candidates(trials, 2)] == [0, 4, 1, 2]

    # the budget curve: plain + recompute is its own series
    recs = [SimpleNamespace(number=0, state="complete", predicted_peak_bytes=plain_peak, val_accuracy=0.8,
                            choices=plain),
            SimpleNamespace(number=1, state="complete", predicted_peak_bytes=rc_peak, val_accuracy=0.8,
                            choices=recomputed),
            SimpleNamespace(number=2, state="complete", predicted_peak_bytes=rc_peak - 1, val_accuracy=0.7,
                            choices={layers[0]: "asi@0.9"})]
    assert is_exact(recomputed) and not is_plain(recomputed) and not is_exact({layers[0]: "asi@0.9"})
    at_rc = budget_curve(recs, [rc_peak])[0]
    assert (at_rc.plain_accuracy, at_rc.exact_accuracy, at_rc.exact_trial, at_rc.any_accuracy) == (None, 0.8, 1, 0.8)


def test_the_summary_codes_come_from_the_methods():
    from autorank.app import _short_plan

    keys = {"a": "frozen", "b": "full", "c": "asi@0.9", "d": "asi@0.95:b", "e": "lora@4", "f": "lora@8+asi@0.8",
            "g": "recompute"}
    assert _short_plan(keys) == "- F .9 .95b L4 L8.8 R"
