"""Workload: model cutting, the cached base checkpoint, the feature cache and fine-tuning one plan
(the data options: test_data.py). small_cnn, tiny inputs, each test in its own tmp_path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from autorank.cost.process import FIRST_STEP_OVERHEAD_BYTES
import torch
from torch import nn

from autorank.plan import Choice, Plan, apply_plan
from autorank.workload import base as base_mod
from autorank.workload.device import DeviceProfile
from autorank.workload.features import FeatureCache
from autorank.models import (
    cut_name,
    flatten_blocks,
    mcunet_like,
    mobilenet_v2,
    resnet18,
    small_cnn,
    split_at_first_trained,
)
from autorank.workload.module import PlanModule
from autorank.workload.workload import TrainingFailed, Workload

torch.set_num_threads(1)  # small models; the test machine is shared


# --- models and the cut --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, trained, cut",
    [
        (small_cnn, ["conv2"], "conv2"),
        (small_cnn, ["fc", "conv3"], "conv3"),
        (mcunet_like, ["features.14.conv.0.0"], "features.14"),
        (mobilenet_v2, ["features.17.conv.1.0", "classifier.1"], "features.17"),
        (mobilenet_v2, ["features.18.0"], "features.18.0"),
        (resnet18, ["layer4.1.conv2", "fc"], "layer4.1"),
        (resnet18, ["conv1"], "conv1"),
    ],
)
def test_split_equals_full_model(factory, trained, cut):
    torch.manual_seed(0)
    model = factory(num_classes=5).eval()
    prefix, suffix = split_at_first_trained(model, trained)
    assert cut_name(model, trained) == cut
    assert len(prefix) + len(suffix) == len(flatten_blocks(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), model(x), rtol=0, atol=0)


def test_model_names_and_sizes():
    names = dict(mobilenet_v2(num_classes=5).named_modules())
    assert "features.18.0" in names and isinstance(names["classifier.1"], nn.Linear)
    names = dict(resnet18(num_classes=5).named_modules())
    assert isinstance(names["layer4.1.conv2"], nn.Conv2d) and isinstance(names["fc"], nn.Linear)
    n = sum(p.numel() for p in mcunet_like(num_classes=10).parameters())
    assert 0.5e6 < n < 1.1e6
    assert any(isinstance(m, nn.ReLU6) for m in mcunet_like().modules())
    assert small_cnn(num_classes=3, in_channels=1)(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


def test_split_with_applied_plan_keeps_outputs():
    torch.manual_seed(0)
    model = small_cnn(num_classes=5).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    plan = Plan(layers={"conv3": Choice.full(), "fc": Choice.full()})
    apply_plan(model, plan)
    prefix, suffix = split_at_first_trained(model, plan)
    assert cut_name(model, plan) == "conv3"
    assert not any(p.requires_grad for p in prefix.parameters())
    with torch.no_grad():
        torch.testing.assert_close(suffix.eval()(prefix.eval()(x)), ref, rtol=1e-6, atol=1e-6)


def test_device_budget():
    dev = DeviceProfile("d", ram_mb=2048, os_mb=300, runtime_mb=400, gflops_fp32=2.0)
    assert dev.budget_bytes == (2048 - 300 - 400) * 2**20 - FIRST_STEP_OVERHEAD_BYTES
    assert DeviceProfile("d", 2048, 300, 400, 2.0, budget_mb=100).budget_bytes == 100 * 2**20
    assert dev.step_time_s(4e9) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        DeviceProfile("d", ram_mb=512, os_mb=300, runtime_mb=400, gflops_fp32=2.0)


# --- base model, feature cache, fine-tuning ------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One pretrained small_cnn checkpoint for the fine-tuning tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_workload(small_workload):
    """make_workload(tmp_path, cache_dir=None, **trainer): the tests' small Workload (conftest),
    pretrained 2 epochs and fine-tuned up to 8 unless `trainer` says otherwise."""
    def make(tmp_path, cache_dir=None, **trainer) -> Workload:
        return small_workload(tmp_path, cache_dir=cache_dir, **{"pretrain_epochs": 2, "max_epochs": 8, **trainer})

    return make


def test_checkpoint_cached_and_reused(tmp_path, monkeypatch, make_workload):
    calls = []
    real = base_mod.pretrain
    monkeypatch.setattr(base_mod, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = make_workload(tmp_path)
    first.prepare(progress=False)
    path = first.checkpoint_path
    mtime = os.stat(path).st_mtime_ns
    second = make_workload(tmp_path)
    second.prepare(progress=False)
    assert calls == [1]  # the second workload loaded the file, it did not train
    sidecar = path.with_suffix(".json")  # written atomically: no temp file left beside it
    assert json.loads(sidecar.read_text())["key"]["epochs"] == 2
    assert sorted(q.name for q in path.parent.iterdir()) == sorted([path.name, sidecar.name])
    assert second.checkpoint_path == path and os.stat(path).st_mtime_ns == mtime
    assert second.checkpoint_sha256 == first.checkpoint_sha256
    for (n, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert not any(p.name == "lightning_logs" for p in tmp_path.rglob("*")) and not os.path.exists("lightning_logs")
    # another pretraining setting is another checkpoint
    assert make_workload(tmp_path, pretrain_epochs=1).checkpoint_path != path
    assert calls == [1, 1]


def test_model_checkpoint_path_is_loaded(tmp_path, make_workload):
    torch.manual_seed(3)
    ref = small_cnn(num_classes=5)
    path = tmp_path / "w.pt"
    torch.save(ref.state_dict(), path)
    wl = make_workload(tmp_path)
    wl.spec.checkpoint = str(path)
    assert wl.checkpoint_path == path
    torch.testing.assert_close(wl.model.conv2.weight, ref.conv2.weight, rtol=0, atol=0)


def test_feature_cache_equals_prefix(tmp_path):
    torch.manual_seed(0)
    model = small_cnn(num_classes=5).eval()
    prefix, _ = split_at_first_trained(model, ["conv3"])
    xs = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    batches = lambda: [(x, torch.zeros(4, dtype=torch.long)) for x in xs]  # noqa: E731
    cache = FeatureCache(tmp_path / "f")
    key = {"cut": "conv3"}
    feats, labels = cache.get(key, prefix, batches)
    with torch.no_grad():
        torch.testing.assert_close(feats, prefix(torch.cat(xs)), rtol=0, atol=0)
    assert labels.shape == (12,)
    assert cache.get(key, prefix, batches)[0] is feats and (cache.hits, cache.misses) == (1, 1)
    fresh = FeatureCache(tmp_path / "f")  # from disk
    torch.testing.assert_close(fresh.get(key, None, None)[0], feats, rtol=0, atol=0)


def test_finetune_learns_downstream_digits(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=5)
    plan = Plan(layers={"conv2": Choice.full(), "conv3": Choice.full(), "fc": Choice.full()})
    r = wl.finetune(plan)
    assert r.cut == "conv2" and r.epochs == 5
    assert r.val_accuracy > 0.6  # 5 classes: chance is 0.2
    assert np.isfinite(r.train_loss) and r.train_loss < 1.2
    # measured at the device batch (32, 3, 16, 16): the same bytes the whole planned model saves,
    # since the frozen prefix records no graph
    from autorank.cost import measure_saved_bytes

    model = apply_plan(__import__("copy").deepcopy(wl.model), plan)
    PlanModule(model).train()
    x, y = wl.calibration_batches(1)[0]
    assert x.shape == wl.input_shape == (32, 3, 16, 16)
    full = measure_saved_bytes(lambda: model(x), model)  # the model's saved tensors (no loss)
    assert r.measured_activation_bytes == full.activation_bytes > 0
    # ... and what the cost model predicts for the base model in its fine-tuning mode
    from autorank.cost import predict_saved_bytes

    assert predict_saved_bytes(wl.model, wl.example_input(), plan).activation_bytes == full.activation_bytes
    # the base model is untouched by the trial
    assert all(not hasattr(m, "base_layer") for m in wl.model.modules())


def test_finetune_measures_the_step_flops_train_step_flops_predicts(tmp_path, shared_cache, make_workload):
    from autorank.cost import train_step_flops

    wl = make_workload(tmp_path, shared_cache, max_epochs=1)
    B = wl.input_shape[0]  # 32 images of 3 x 16 x 16, width 8, 5 classes
    # fc only: the prefix (conv1..pool) runs forward; fc forward and its grad_weight (no
    # grad_input: its input needs none), 2*B*in*out each.
    fc = Plan(layers={"fc": Choice.full()})
    r = wl.finetune(fc)
    prefix = 2 * B * (16 * 16 * 8 * 3 * 9 + 8 * 8 * 16 * 8 * 9 + 4 * 4 * 32 * 16 * 9)
    assert r.extra["measured_prefix_flops"] == prefix == 12_976_128
    assert r.measured_flops == prefix + 2 * (2 * B * 32 * 5)
    assert r.measured_flops == train_step_flops(wl.model, wl.example_input(), fc)
    # a cut inside the network, an ASI layer (its QR/compression ops counted too) and the head
    for plan in (Plan(layers={"conv2": Choice.full(), "conv3": Choice.full(), "fc": Choice.full()}),
                 Plan(layers={"conv3": Choice.asi([8, 4, 2, 2]), "fc": Choice.full()})):
        r = wl.finetune(plan)
        predicted = train_step_flops(wl.model, wl.example_input(), plan)
        assert 0 < r.extra["measured_prefix_flops"] < r.measured_flops
        assert abs(r.measured_flops - predicted) <= 0.01 * predicted, (plan.layers, r.measured_flops, predicted)


def test_bad_feature_cache_is_a_config_error(tmp_path, make_workload):
    from autorank.errors import ConfigError

    with pytest.raises(ConfigError, match="'ram'"):
        make_workload(tmp_path, feature_cache="ram")


def test_checkpoint_errors_are_config_errors(tmp_path, make_workload):
    from autorank.errors import ConfigError

    wl = make_workload(tmp_path)
    wl.spec.checkpoint = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt") as e:  # still a FileNotFoundError
        wl.prepare(progress=False)
    assert isinstance(e.value, ConfigError)
    torch.save(small_cnn(num_classes=5, width=4).state_dict(), tmp_path / "narrow.pt")
    wl = make_workload(tmp_path)
    wl.spec.checkpoint = str(tmp_path / "narrow.pt")
    with pytest.raises(ConfigError, match=r"narrow.pt does not fit the model.*conv1.weight"):
        wl.prepare(progress=False)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="text.pt"):
        base_mod.load_weights(small_cnn(num_classes=5), tmp_path / "text.pt")


def test_finetune_cached_features_reused_across_trials(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=1)
    wl.finetune(Plan(layers={"fc": Choice.full()}))
    r = wl.finetune(Plan(layers={"fc": Choice.full()}))
    assert (wl.features.misses, wl.features.hits) == (2, 2)  # train + val once, then hits
    assert r.features_wall_s < 0.05


def test_finetune_with_asi_plan(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=2)
    full = wl.finetune(Plan(layers={"conv3": Choice.full(), "fc": Choice.full()}))
    asi = wl.finetune(Plan(layers={"conv3": Choice.asi([8, 4, 2, 2]), "fc": Choice.full()}))
    assert asi.val_accuracy > 0.4
    assert asi.measured_activation_bytes < full.measured_activation_bytes


def test_bn_stays_in_eval_mode(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=1)
    wl.prepare(progress=False)
    before = wl.model.bn3.running_mean.clone()
    plan = Plan(layers={"conv3": Choice.full(), "fc": Choice.full()}, bn="train", lean=False)
    model = apply_plan(__import__("copy").deepcopy(wl.model), plan)
    module = PlanModule(model, bn_eval=True).train()
    assert not model.bn3.training and model.conv3.training
    x, y = wl.calibration_batches(1)[0]
    nn.functional.cross_entropy(module(x), y).backward()
    torch.testing.assert_close(model.bn3.running_mean, before, rtol=0, atol=0)


def test_nan_loss_raises_training_failed(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=1)
    wl.prepare(progress=False)
    with torch.no_grad():
        wl.model.fc.weight.fill_(float("nan"))
    with pytest.raises(TrainingFailed, match="loss is nan"):
        wl.finetune(Plan(layers={"fc": Choice.full()}))


def test_feature_cache_builds_a_deeper_cut_from_a_shallower_one(tmp_path, shared_cache, make_workload):
    wl = make_workload(tmp_path, shared_cache, max_epochs=1)
    wl.finetune(Plan(layers={"conv2": Choice.full()}))  # cut before conv2: from the images
    calls = []
    orig = FeatureCache.get

    def spy(self, key, prefix, batches):
        calls.append((key["cut_index"], None if prefix is None else len(prefix)))
        return orig(self, key, prefix, batches)

    FeatureCache.get = spy
    try:
        r = wl.finetune(Plan(layers={"fc": Choice.full()}))  # deeper cut: from the cached one
    finally:
        FeatureCache.get = orig
    blocks = flatten_blocks(wl.model)
    n_fc = next(i for i, (b, _) in enumerate(blocks) if b == "fc")
    n_conv2 = next(i for i, (b, _) in enumerate(blocks) if b == "conv2")
    # train and val: each reads the cut-before-conv2 features and runs only the blocks in between
    assert calls == [(n_conv2, None), (n_fc, n_fc - n_conv2)] * 2
    # and the result equals running the whole prefix on the images
    prefix, _ = split_at_first_trained(wl.model, ["fc"])
    feats, _ = wl.features.get({**_key_of(wl, n_fc, "train")}, None, None)
    with torch.no_grad():
        ref = torch.cat([prefix.eval()(xb) for xb, _ in wl.data.loader("downstream", "train")])
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert r.cut == "fc"


def _key_of(wl, i, part):
    return {"checkpoint_sha256": wl.checkpoint_sha256, "head_seed": wl.trainer.seed, "cut_index": i,
            "data": wl.data.key("downstream"), "part": part}
