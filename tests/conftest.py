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


# The small end-to-end settings of the app (a 6 k-parameter CNN on 16 px digits), shared by the
# slow tests that need a pretrained base model.
SMALL_APP_ARGS = ("model=small_cnn", "data.input_size=16", "data.batch_size=32", "trainer.max_epochs=2",
                  "trainer.pretrain_epochs=2", "trainer.steps=6", "space=small")


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory):
    """(cache_dir, args): a cache folder (paths.cache_dir=...) holding the base model and profile
    of the small settings `args`, made once per session by a knapsack run of the app, so that a
    slow test of a later step starts where the work begins."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("pretrained")
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", *SMALL_APP_ARGS, "search=knapsack",
                        f"export.path={root}/plan.yaml"], cwd=root, env={**os.environ, "AUTORANK_ROOT": str(root)},
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / ".cache" / "autorank", list(SMALL_APP_ARGS)

