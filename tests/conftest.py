"""Shared fixtures. No test imports another test module: what several files need lives here.

Heavy imports (Hydra, the app) happen inside the fixtures, so the torch-only tests stay light.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(overrides=(), config_name="config") -> the app's config composed by Hydra as
    a run in `tmp_path` would see it: hydra.runtime.cwd = tmp_path, hydra.runtime.output_dir =
    tmp_path/out, and HydraConfig set, so `${hydra:...}` values resolve and instantiate works.

    config_name=None composes only the groups the overrides name (`+device=rpi4`, ...), the
    primary config left out. Paths default from the runtime values (paths.root = tmp_path unless
    $AUTORANK_ROOT is set); pass `paths.*` overrides to pin them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from autorank.app import CONF_DIR

    def compose_cfg(overrides=(), config_name: str | None = "config"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.cwd = str(tmp_path)
            cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield compose_cfg
    GlobalHydra.instance().clear()
