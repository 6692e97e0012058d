"""`autorank-bench methods`' plans: per method and k, the kinds it names per layer (the last k
blocks' linear layers, the head plainly), the paper's count by formula, and the whole region's
predicted saved bytes equal to the measured ones, on a tiny ViT and a tiny Llama (no training)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from autorank.cost import measure_saved_bytes, predict_saved_bytes
from autorank.cost.loss import logits_of
from autorank.models import transformer_blocks, vit_tiny
from autorank.plan import apply_plan, candidate_layers, finetune_mode

B, RANK = 4, 4


@pytest.fixture(scope="module")
def cm():
    from autorank.bench import methods

    return methods


@functools.cache
def built(name):
    torch.manual_seed(0)
    if name == "vit":  # 32 px in 8 px patches: L = 17 tokens, width 128
        return finetune_mode(vit_tiny(num_classes=5, num_layers=3), True), torch.randn(B, 3, 32, 32)
    pytest.importorskip("transformers")
    from autorank.models import tiny_llama

    return finetune_mode(tiny_llama(num_layers=3), True), torch.randint(0, 256, (B, 24))


def input_shapes(model, names, x):
    shapes, handles = {}, []
    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def tucker_numel(shape, ranks):  # core + the factor of each compressed mode (rank < size)
    r = [min(a, b) for a, b in zip(ranks, shape)]
    return math.prod(r) + sum(s * q for s, q in zip(shape, r) if q < s)


def paper_numel(method, shape, choice):
    """What one trained linear layer saves for its weight gradient, by formula (fp32 elements)."""
    if method == "full":
        return math.prod(shape)
    if method in ("asi", "asib"):
        return tucker_numel(shape, choice.ranks)
    a_input = math.prod(shape) if method == "lora" else tucker_numel(shape, choice.ranks)
    return a_input + math.prod(shape[:-1]) * RANK  # + B's rank-wide input A(x)


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_plans_kinds_paper_count_and_bytes(cm, name):
    model, x = built(name)
    plans = cm.build_plans(model, x, [1, 2], list(cm.METHODS), 0.9, RANK)
    assert sorted(plans) == sorted(f"{m}@k{k}" for m in cm.METHODS for k in (1, 2))
    blocks, head = [lin for _, lin in transformer_blocks(model)], candidate_layers(model)[-1]
    shapes = input_shapes(model, blocks[-1] + blocks[-2] + [head], x)
    for k in (1, 2):
        region = [n for lin in blocks[-k:] for n in lin]
        assert len(region) == k * (6 if name == "vit" else 7)
        ranks = plans[f"asi@k{k}"][0].layers
        for method in cm.METHODS:
            plan, info = plans[f"{method}@k{k}"]
            assert set(plan.layers) == {*region, head} and plan.layers[head].kind == "full"
            kinds = {str(plan.layers[n]).split("[")[0] for n in region}
            assert kinds == {{"full": "full", "asi": "asi", "asib": "asi"}.get(method, "lora")}
            if method == "lora":
                assert all(plan.layers[n].rank == RANK and plan.layers[n].ranks is None for n in region)
            if method == "lora_asi":  # A's input at the asi plan's ranks
                assert all(plan.layers[n].ranks == ranks[n].ranks for n in region)
            if method == "asib":  # the batch mode kept whole, the others as asi's
                assert all(plan.layers[n].ranks == (B, *ranks[n].ranks[1:]) for n in region)
            expected = 4 * (sum(paper_numel(method, shapes[n], plan.layers[n]) for n in region)
                            + math.prod(shapes[head]))
            assert info["paper_saved_bytes"] == expected, (method, k)
            applied = apply_plan(copy.deepcopy(model), plan)
            measured = measure_saved_bytes(lambda: logits_of(applied(x)), applied).activation_bytes
            assert predict_saved_bytes(model, x, plan).activation_bytes == measured, (method, k)
    full2, asi2 = plans["full@k2"][1]["paper_saved_bytes"], plans["asi@k2"][1]["paper_saved_bytes"]
    assert asi2 < full2 < plans["lora@k2"][1]["paper_saved_bytes"]


def test_summary_budget_and_spread(cm):
    rows = [{"model": "llm", "plan": p, "method": p.split("@")[0], "seed": s, "lr": 0.1, "chosen": True,
             "val_accuracy": acc, "val_accuracy_half": acc - 0.01, "val_loss": loss, "peak_mb": peak,
             "measured_saved_bytes": 10, "predicted_saved_bytes": 10, "paper_saved_bytes": 2**20,
             "gflop_per_step": 1.0, "s_per_step": 0.1}
            for p, peak, s, acc, loss in [("full@k2", 43.0, 0, 0.5, 1.6), ("full@k2", 43.0, 1, 0.6, 1.8),
                                          ("asi@k2", 38.0, 0, 0.4, 2.0), ("lora_asi@k2", 37.0, 0, 0.45, 1.9)]]
    rows.append({**rows[0], "chosen": False, "val_accuracy": 0.9})  # a sweep row not chosen: not counted
    summ = {s["plan"]: s for s in cm.summary(rows, None)}
    assert summ["full@k2"]["budget_mb"] == 38.0 and not summ["full@k2"]["fits"] and summ["asi@k2"]["fits"]
    assert summ["full@k2"]["seeds"] == 2 and summ["full@k2"]["acc_mean"] == pytest.approx(0.55)
    assert summ["full@k2"]["acc_spread"] == pytest.approx(0.1)
    assert summ["full@k2"]["ppl_mean"] == pytest.approx((math.exp(1.6) + math.exp(1.8)) / 2)
