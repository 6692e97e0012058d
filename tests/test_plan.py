"""Plans: file round trip, apply/remove round trip, requires_grad, mismatches refused."""

import json
import os
import stat

import pytest
import torch
import torch.nn as nn

from autorank.cost import measure_saved_bytes
from autorank.plan import (Choice, Plan, apply_plan, candidate_layers, finetune_mode, model_fingerprint,
                           remove_plan, trained_region)
from autorank.shortcut import ASIConv2d, ASILinear, FrozenBatchNorm2d, FrozenConv2d, HOSVDConv2d, PackedReLU


def tiny_cnn(width=8, classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


PLANS = {
    "full_last2": Plan({"9": Choice.full(), "14": Choice.full()}, lean=False),
    "asi_lean": Plan({"6": Choice.asi([2, 4, 4, 4]), "9": Choice.asi([2, 8, 2, 2]), "14": Choice.full()}),
    "hosvd_bn_train": Plan({"9": Choice.hosvd(0.8), "14": Choice.asi([2, 4])}, bn="train"),
}


def test_choice_strings_round_trip():
    for c in [Choice.frozen(), Choice.full(), Choice.asi([8, 64, 4, 4]), Choice.hosvd(0.8)]:
        assert Choice.parse(str(c)) == c
    assert str(Choice.asi([8, 64, 4, 4])) == "asi[8,64,4,4]"
    with pytest.raises(ValueError):
        Choice.asi([0, 2])
    with pytest.raises(ValueError):
        Choice.parse("__import__('os')")


def test_candidate_layers_and_region():
    m = tiny_cnn()
    assert candidate_layers(m) == ["0", "3", "6", "9", "14"]
    assert trained_region(m, PLANS["full_last2"]) == ["9", "10", "11", "12", "13", "14"]
    assert trained_region(m, Plan({})) == []


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_file_round_trip(tmp_path, suffix):
    m = tiny_cnn()
    plan = Plan({"6": Choice.asi([2, 4, 4, 4]), "9": Choice.hosvd(0.7), "14": Choice.full()}, bn="train",
                lean=False, meta={"source": "test", "level": 0.8})
    path = plan.save(tmp_path / f"plan{suffix}", model=m)
    loaded = Plan.load(path)
    assert loaded.layers == plan.layers and loaded.bn == "train" and loaded.lean is False
    assert loaded.meta == {"source": "test", "level": 0.8}
    assert loaded.fingerprint == model_fingerprint(m)
    raw = path.read_text()
    d = json.loads(raw) if suffix == ".json" else __import__("yaml").safe_load(raw)
    assert d["format_version"] == 1 and d["autorank_version"] == __import__("autorank").__version__
    assert d["layers"]["6"] == "asi[2,4,4,4]"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "plan.yaml"
    Plan({"14": Choice.full()}).save(path)
    good = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        Plan({"9": Choice.full()}).save(path)
    assert path.read_text() == good
    assert list(tmp_path.iterdir()) == [path]


def test_mismatched_model_refused_naming_the_layer(tmp_path):
    path = Plan({"14": Choice.full()}).save(tmp_path / "p.yaml", model=tiny_cnn(width=8))
    with pytest.raises(ValueError, match="'0'"):  # first layer differs: Conv2d(3, 16) vs (3, 8)
        apply_plan(tiny_cnn(width=16), path)
    other = tiny_cnn()
    other[9] = nn.Conv2d(16, 16, 5, padding=2, bias=False)
    with pytest.raises(ValueError, match="'9'"):
        apply_plan(other, path)
    with pytest.raises(ValueError, match="'features.3'"):
        apply_plan(tiny_cnn(), Plan({"features.3": Choice.full()}))
    apply_plan(other, path, strict=False)  # names still fit: applied without the fingerprint


@pytest.mark.parametrize("name", sorted(PLANS))
def test_apply_remove_round_trip(name):
    m = tiny_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    before_sd = {k: v.clone() for k, v in m.state_dict().items()}
    before_rg = {k: p.requires_grad for k, p in m.named_parameters()}
    with torch.no_grad():
        y0 = m(x)
    modules = list(m)
    apply_plan(m, PLANS[name])
    with torch.no_grad():
        assert torch.allclose(m(x), y0, atol=1e-6)  # the plan changes training, not the function
    remove_plan(m)
    assert list(m) == modules  # the very same module objects
    with torch.no_grad():
        assert torch.equal(m(x), y0)
    sd = m.state_dict()
    assert sd.keys() == before_sd.keys() and all(torch.equal(sd[k], before_sd[k]) for k in sd)
    assert {k: p.requires_grad for k, p in m.named_parameters()} == before_rg


def test_swaps_and_requires_grad():
    m = apply_plan(tiny_cnn(), PLANS["asi_lean"])
    assert isinstance(m[6], ASIConv2d) and isinstance(m[9], ASIConv2d) and type(m[14]) is nn.Linear
    assert m[6].ranks == [2, 4, 4, 4] and m[6].base_layer.weight is not None
    assert isinstance(m[7], FrozenBatchNorm2d) and isinstance(m[10], FrozenBatchNorm2d)
    assert isinstance(m[8], PackedReLU) and isinstance(m[11], PackedReLU)
    assert type(m[1]) is nn.BatchNorm2d and type(m[2]) is nn.ReLU and type(m[5]) is nn.ReLU6  # before the region
    trained = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trained == {"6.base_layer.weight", "9.base_layer.weight", "14.weight", "14.bias"}

    m = apply_plan(tiny_cnn(), PLANS["hosvd_bn_train"])
    assert isinstance(m[9], HOSVDConv2d) and isinstance(m[14], ASILinear)
    assert type(m[10]) is nn.BatchNorm2d and isinstance(m[11], PackedReLU)  # bn='train': BN kept, trained
    trained = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trained == {"9.base_layer.weight", "10.weight", "10.bias", "14.base_layer.weight", "14.base_layer.bias"}

    m = tiny_cnn()
    m[11] = nn.Identity()
    apply_plan(m, Plan({"6": Choice.full(), "14": Choice.full()}))
    assert isinstance(m[9], FrozenConv2d)  # frozen conv inside the region: grad_input only


def test_frozen_layers_get_no_grad_and_prefix_saves_nothing():
    m = tiny_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    apply_plan(m, PLANS["full_last2"])
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == name.startswith(("9.", "14.")), name
    # nothing before layer 9 is saved: exactly conv 9's input, BN 10's input, ReLU 11's result
    # and the linear's input are (the eval-mode 1x1 pool is a mean and saves nothing)
    measured = measure_saved_bytes(lambda: m(x), m)
    assert measured.activation_bytes == 4 * (3 * (2 * 16 * 8 * 8) + 2 * 16)


def test_apply_twice_replaces_and_loaded_plan_applies(tmp_path):
    from autorank.plan import applied_plan

    m = tiny_cnn().eval()
    path = PLANS["asi_lean"].save(tmp_path / "p.yaml", model=m)
    apply_plan(m, PLANS["full_last2"])
    apply_plan(m, path)  # the first plan is removed before the second goes on
    assert applied_plan(m).layers == PLANS["asi_lean"].layers
    assert isinstance(m[6], ASIConv2d) and isinstance(m[6].base_layer, nn.Conv2d)
    remove_plan(m)
    assert applied_plan(m) is None and type(m[6]) is nn.Conv2d and type(m[8]) is nn.ReLU
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("bn_eval", [True, False])
def test_finetune_mode_train_with_bn_eval(bn_eval):
    model = tiny_cnn().append(nn.Dropout(0.5))
    apply_plan(model, PLANS["asi_lean"])
    model.eval()
    assert finetune_mode(model, bn_eval=bn_eval) is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4  # frozen-BN companions keep their BatchNorm as base_layer, set too
    assert all(m.training != bn_eval for m in bns)
    others = [m for m in model.modules() if not isinstance(m, nn.BatchNorm2d)]
    assert others and all(m.training for m in others)
    # dropout is live: two forwards differ; BN running stats untouched when bn_eval
    stats = [m.running_mean.clone() for m in bns]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns)) == bn_eval


# ------------------------------------------------------------- atomic_write, base weights in/out

def test_atomic_write_keeps_suffix_and_cleans_up(tmp_path):
    from autorank.plan import atomic_write

    seen = []
    path = tmp_path / "sub" / "fig.png"
    assert atomic_write(path, lambda tmp: seen.append(tmp) or tmp.write_bytes(b"new")) == path
    assert path.read_bytes() == b"new"
    assert seen[0].parent == path.parent and seen[0].name.endswith(".png") and seen[0] != path
    assert list(path.parent.iterdir()) == [path]

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"new" and list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_ordinary_permissions(tmp_path, umask):
    """Like open(path, "w"): mode 0o666 minus the umask (not mkstemp's 0o600), for a new file
    and for one written over an old file."""
    from autorank.plan import atomic_write

    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "plan.yaml", lambda tmp: tmp.write_text("a: 1\n"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.chmod(0o600)
        Plan({"14": Choice.full()}).save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        ref = tmp_path / "ref"
        ref.write_text("x")  # what open() gives under this umask
        assert stat.S_IMODE(ref.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(old)


def test_save_base_weights_removes_the_plan_and_puts_it_back(tmp_path):
    from autorank.plan import applied_plan, save_base_weights

    model = tiny_cnn()
    plain = set(model.state_dict())
    apply_plan(model, PLANS["asi_lean"])
    assert any("base_layer" in k for k in model.state_dict())  # the bug: keys of the wrapped model
    path = save_base_weights(model, tmp_path / "w" / "weights.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == plain
    assert applied_plan(model) is PLANS["asi_lean"]
    assert isinstance(model[6], ASIConv2d) and isinstance(model[1], nn.BatchNorm2d)
    assert list(path.parent.iterdir()) == [path]
    fresh = tiny_cnn(width=8)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_load_base_weights_fails_loudly_except_for_the_head(tmp_path):
    from autorank.plan import applied_plan, classifier_head, load_base_weights

    src = tiny_cnn(classes=10)
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(2.0)
    torch.save(src.state_dict(), tmp_path / "up.pt")
    model = apply_plan(tiny_cnn(classes=5), PLANS["asi_lean"])  # loading works with a plan applied
    head_before = model[14].weight.detach().clone()
    assert classifier_head(model) == "14"
    assert load_base_weights(model, tmp_path / "up.pt") == ["14.weight", "14.bias"]
    assert applied_plan(model) is PLANS["asi_lean"] and isinstance(model[6], ASIConv2d)
    assert torch.equal(model[6].base_layer.weight, src[6].weight)
    assert torch.equal(model[14].weight, head_before)  # the head keeps its fresh values

    with pytest.raises(ValueError, match=r"other shape: 14.weight \[10, 16\] vs model \[5, 16\]"):
        load_base_weights(tiny_cnn(classes=5), tmp_path / "up.pt", skip_mismatched_head=False)
    with pytest.raises(ValueError, match=r"other shape: 0.weight \[4, 3, 3, 3\]"):
        load_base_weights(tiny_cnn(), tiny_cnn(width=4).state_dict())
    state = tiny_cnn().state_dict()
    del state["3.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 keys: 3.weight; unexpected 1 keys: extra.weight"):
        load_base_weights(tiny_cnn(), state)
    # a model saved with its plan applied (the old device script): refused, with the reason
    wrapped = apply_plan(tiny_cnn(), PLANS["asi_lean"]).state_dict()
    with pytest.raises(ValueError, match="saved while a plan was applied"):
        load_base_weights(tiny_cnn(), wrapped)
    # a Lightning checkpoint: state_dict with a model. prefix
    ckpt = {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    fresh = tiny_cnn(classes=10)
    assert load_base_weights(fresh, ckpt) == []
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match="not a state dict"):
        load_base_weights(fresh, {"w": 3})


def test_build_model_from_factory_trusts_only_autorank_factories():
    from autorank.plan import build_model_from_factory

    m = build_model_from_factory("autorank.workload.models:small_cnn", {"num_classes": 3, "width": 4})
    assert [mm for mm in m.modules() if isinstance(mm, nn.Linear)][-1].out_features == 3
    with pytest.raises(ValueError, match="not one of autorank's"):
        build_model_from_factory("os:system", {"command": "true"})
    with pytest.raises(ValueError, match="has no function"):
        build_model_from_factory("autorank.workload.models:nope")
    assert isinstance(build_model_from_factory("torch.nn:Identity", trusted_only=False), nn.Identity)
