"""Every option of the workload's config groups (device, model, data, trainer, paths) composes and
instantiates through hydra.utils.instantiate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from autorank.app import CONF_DIR
from autorank.models import ModelSpec
from autorank.workload.data import ImageData
from autorank.workload.textdata import TextData
from autorank.cost.process import FIRST_STEP_OVERHEAD_BYTES
from autorank.workload.device import DeviceProfile
from autorank.workload.workload import Paths, TrainerConfig

CONF = CONF_DIR  # the configs inside the package (autorank/conf): what a wheel ships
GROUPS = ("device", "model", "data", "trainer", "paths")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_groups(tmp_path: Path, **choice: str):
    """The five workload groups composed on their own (a test-local primary config), with the
    hydra runtime values a real run would have."""
    pick = {"device": "rpi4", "model": "small_cnn", "data": "digits", "trainer": "default", "paths": "default"}
    pick.update(choice)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+{g}={o}" for g, o in pick.items()], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("AUTORANK_ROOT", raising=False)


def test_every_group_has_options():
    assert options("device") == ["jetson_nano", "jetson_orin_nano", "phone", "rpi4", "rpi5"]
    assert options("model") == ["mcunet_like", "mobilenet_v2", "resnet18", "small_cnn", "tiny_llama", "vit_tiny"]
    assert options("data") == ["cifar10", "digits", "digits_vit", "fashion_mnist", "image_folder",
                               "stdlib_licenses"]


@pytest.mark.parametrize("name", options("device"))
def test_device_options(tmp_path, name):
    dev = instantiate(compose_groups(tmp_path, device=name).device)
    assert isinstance(dev, DeviceProfile) and dev.name == name
    overhead = FIRST_STEP_OVERHEAD_BYTES / 2**20
    assert dev.budget_bytes == int((dev.ram_mb - dev.os_mb - dev.runtime_mb - overhead) * 2**20)
    assert set(dev.sources) == {"ram_mb", "os_mb", "runtime_mb", "gflops_fp32"}
    assert all(len(v) > 20 for v in dev.sources.values())  # each figure says where it comes from
    assert dev.step_time_s(dev.gflops_fp32 * 1e9) == pytest.approx(1.0)


def test_budget_override(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+device=rpi4", "device.budget_mb=512"])
    dev = instantiate(cfg.device)
    assert dev.budget_bytes == 512 * 2**20


@pytest.mark.parametrize("name", options("model"))
def test_model_options(tmp_path, name):
    # a ViT's image size is its data option's input size (vit_tiny: image_size: ${data.input_size})
    cfg = compose_groups(tmp_path, model=name, **({"data": "digits_vit"} if name == "vit_tiny" else {}))
    spec = instantiate(cfg.model)
    assert isinstance(spec, ModelSpec) and spec.name == name and spec.checkpoint is None
    # the name a plan file records, which the device runner builds from with torch alone
    assert spec.key()["factory"] == f"autorank.models.{name}"
    if name == "tiny_llama":  # tokens in, logits over the byte vocabulary out; no num_classes taken
        pytest.importorskip("transformers")
        model = spec(num_classes=7).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 8, dtype=torch.long)).logits.shape == (2, 8, 256)
        assert "num_classes" not in spec.key()["kwargs"]
        return
    model = spec(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    if name == "vit_tiny":
        assert spec.key()["kwargs"]["image_size"] == cfg.data.input_size == 32


@pytest.mark.parametrize("name", options("data"))
def test_data_options(tmp_path, name):
    data = instantiate(compose_groups(tmp_path, data=name).data)
    if name == "stdlib_licenses":  # text: nothing read until used (the corpora are the OS's)
        assert isinstance(data, TextData) and data.loss == "token" and data.num_classes() == 256
        assert data.input_shape == (data.batch_size, data.seq_len) and data.max_bytes > 0
        assert data.patterns["upstream"] == ["{stdlib}/*.py"]
        return
    assert isinstance(data, ImageData)
    assert data.input_size > 0 and data.batch_size > 0
    if name != "image_folder":  # class split known without reading the folder
        assert set(data.classes("upstream")).isdisjoint(data.classes("downstream"))
    if name in ("fashion_mnist", "cifar10", "image_folder"):
        assert data.root.startswith(str(tmp_path / "data"))


def test_trainer_and_paths(tmp_path):
    cfg = compose_groups(tmp_path)
    trainer, paths = instantiate(cfg.trainer), instantiate(cfg.paths)
    assert isinstance(trainer, TrainerConfig) and trainer.bn_eval is True and trainer.accelerator == "cpu"
    assert isinstance(paths, Paths)
    assert paths.root == str(tmp_path)
    assert paths.output_dir == str(tmp_path / "out")
    assert paths.cache_dir == str(tmp_path / ".cache" / "autorank")
    assert paths.data_dir == str(tmp_path / "data")


def test_paths_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORANK_ROOT", str(tmp_path / "elsewhere"))
    paths = instantiate(compose_groups(tmp_path).paths)
    assert paths.cache_dir == str(tmp_path / "elsewhere" / ".cache" / "autorank")


@pytest.mark.parametrize("model, extra", [("small_cnn", 0), ("mcunet_like", 0), ("mobilenet_v2", 130),
                                          ("resnet18", 130)])
def test_model_runtime_in_the_budget(tmp_path, model, extra):
    """A torchvision model's config adds its measured runtime to the device's: the rpi4's training
    budget is 130 MB smaller with mobilenet_v2 than with mcunet_like (torch alone)."""
    from autorank.units import MB
    from autorank.workload import Workload

    wl = Workload.from_config(compose_groups(tmp_path, model=model))
    assert wl.device.runtime_mb == 240 + extra
    overhead = 24 * MB
    assert wl.device.budget_bytes == int((1024 - 300 - 240 - extra) * MB - overhead)
    if extra:
        assert "for " + model in wl.device.sources["runtime_mb"]
