"""Recomputation (activation checkpointing of blocks): exact gradients, the plan file, predicted
bytes and peaks equal to the measured ones, and FLOPs = plain training's + one forward of the
recomputed blocks."""

import copy

import pytest
import torch
import torch.nn as nn

from autorank.cost import predict_peak_training_bytes, predict_saved_bytes, train_step_flops
from autorank.cost.flops import conv_forward_flops
from autorank.cost.live import measure_peak_training
from autorank.cost.measure import measure_saved_bytes
from autorank.methods import Recompute, get_method, parse_choice, short_code
from autorank.models import mcunet_like
from autorank.plan import Choice, Plan, PlanError, apply_plan, candidate_layers, finetune_mode, model_fingerprint, remove_plan

torchvision = pytest.importorskip("torchvision")


def _mcunet():
    torch.manual_seed(0)
    return finetune_mode(mcunet_like(num_classes=10))


def _mobilenet():
    torch.manual_seed(0)
    return finetune_mode(torchvision.models.mobilenet_v2(weights=None, num_classes=10))


def _region_plan(model, first: int, recompute=(), asi=()):
    """Every conv/linear layer from the `first`-th on trains plainly (the listed ones by ASI),
    the blocks in `recompute` are recomputed."""
    c = candidate_layers(model)
    layers = {n: (Choice.asi([2, 8, 4, 4]) if n in asi else Choice.full()) for n in c[first:]}
    return Plan(layers | {b: Choice.recompute() for b in recompute})


MODELS = {
    # (factory, input size, first trained layer, recomputed blocks: the region's first ones)
    "mcunet_like": (_mcunet, 64, 3, ("features.2", "features.3")),
    "mobilenet_v2": (_mobilenet, 32, 30, ("features.11", "features.12", "features.13")),
}


def test_the_registry_knows_recompute():
    m = get_method("recompute")
    assert parse_choice("recompute") == Choice.recompute() and str(Choice.recompute()) == "recompute"
    assert not Choice.recompute().trained and m.scope == "module"
    assert short_code("recompute") == "R"
    with pytest.raises(PlanError, match="takes no argument"):
        parse_choice("recompute[2]")
    with pytest.raises(PlanError, match="takes no ranks"):
        Choice("recompute", ranks=(2, 2))


def test_gradients_equal_plain_training():
    model = _mcunet()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    grads = []
    for rc in ((), MODELS["mcunet_like"][3] + ("features.4",)):
        m = apply_plan(copy.deepcopy(model), _region_plan(model, 3, rc))
        assert sum(isinstance(s, Recompute) for s in m.modules()) == len(rc)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-5, atol=1e-6)


def test_the_plan_file_round_trips_and_remove_plan_restores(tmp_path):
    model = _mcunet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    plan = _region_plan(model, 3, ("features.2", "features.3")).for_model(model)
    path = plan.save(tmp_path / "plan.yaml")
    assert "features.2: recompute" in path.read_text()
    loaded = Plan.load(path)
    assert loaded.layers == plan.layers and loaded.layers["features.3"] == Choice.recompute()
    keys = apply_plan(copy.deepcopy(model), _region_plan(model, 3)).state_dict().keys()
    apply_plan(model, loaded)
    assert isinstance(model.features[2], Recompute) and isinstance(model.features[3], Recompute)
    # the names see through the wrapper: the state dict is the same plan's without it
    assert model.state_dict().keys() == keys
    assert model_fingerprint(model) == fp
    remove_plan(model)
    assert not any(isinstance(m, Recompute) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bad_recompute_entries_are_one_line():
    model = _mcunet()
    with pytest.raises(PlanError, match="recompute applies to a block"):
        apply_plan(model, Plan({"classifier.1": Choice.full(), "features.2.conv.0.0": Choice.recompute()}))
    with pytest.raises(PlanError, match="not a conv/linear layer"):
        apply_plan(model, Plan({"classifier.1": Choice.full(), "features.99": Choice.recompute()}))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("asi", [False, True])
def test_predicted_bytes_and_peak_equal_measured(name, asi):
    """The saved bytes and each phase's peak of a real CPU step (tests/test_peak.py's live
    measurement) are predicted exactly; recomputation keeps fewer bytes than plain training and
    never raises the forward's peak."""
    factory, size, first, blocks = MODELS[name]
    model = factory()
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    inside = [n for n in candidate_layers(model) if n.startswith(blocks[0] + ".")]
    results = {}
    for rc in ((), blocks):
        plan = _region_plan(model, first, rc, asi=inside[:2] if asi else ())
        pred = predict_peak_training_bytes(model, x, plan)
        saved = predict_saved_bytes(model, x, plan)
        m = apply_plan(copy.deepcopy(model), plan)
        live = measure_peak_training(m, x, y)
        measured = measure_saved_bytes(lambda: m(x), m)
        assert saved.activation_bytes == measured.activation_bytes
        assert (pred.forward_peak_bytes, pred.backward_peak_bytes, pred.step_peak_bytes) == (
            live.forward_peak_bytes, live.backward_peak_bytes, live.step_peak_bytes)
        assert max(pred.forward_peak_bytes, pred.backward_peak_bytes, pred.step_peak_bytes) == live.peak_bytes
        assert live.peak_bytes <= pred.total_bytes
        results[bool(rc)] = (saved.activation_bytes, pred.forward_peak_bytes)
    assert results[True][0] < results[False][0] and results[True][1] <= results[False][1]


def _conv_flops(block: nn.Module, x: torch.Tensor, model: nn.Module) -> list[int]:
    """The forward FLOPs of each conv of the block, in order, by formula: 2 * B * out spatial *
    numel(weight) (the block's other ops are elementwise: 0)."""
    flops = []

    def hook(mod, args, out):
        flops.append(conv_forward_flops(tuple(args[0].shape), tuple(mod.weight.shape), tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


@pytest.mark.parametrize("name", list(MODELS))
def test_flops_count_the_recomputed_forward(name):
    """A recomputed block adds its forward up to its last conv: torch stops the recomputation
    once the last tensor the backward needs is saved, and an op saves its inputs before it runs
    (early stop, torch's default). Without early stop, the whole forward."""
    factory, size, first, blocks = MODELS[name]
    model = factory()
    x = torch.randn(4, 3, size, size)
    per_block = [_conv_flops(model.get_submodule(b), x, model) for b in blocks]
    assert all(len(f) == 3 for f in per_block)  # inverted residuals: expand, depthwise, project
    plain = train_step_flops(model, x, _region_plan(model, first))
    recomputed = train_step_flops(model, x, _region_plan(model, first, blocks))
    assert recomputed == plain + sum(sum(f[:-1]) for f in per_block)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        whole = train_step_flops(model, x, _region_plan(model, first, blocks))
    assert whole == plain + sum(sum(f) for f in per_block)
