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


# The app's small end-to-end settings (a 6 k-parameter CNN on 16 px digits): the `smoke` preset,
# autorank/conf/experiment/smoke.yaml. Tests add their own options after it; those win.
SMOKE = "+experiment=smoke"


def make_small_workload(root: Path, *, spec=None, data=None, input_size: int = 16, batch_size: int = 32,
                        cache_dir: Path | str | None = None, **trainer):
    """The small Workload of the tests, under `root`: small_cnn(width=8) (or `spec`) on the
    digits at `input_size` px, batch `batch_size` (or `data`), the rpi4 profile (2048 MB RAM, 300
    OS, 400 runtime, 2 GFLOPS), outputs in root/out and caches in `cache_dir` (root/cache);
    `trainer`: TrainerConfig fields (lr 0.05 unless given)."""
    import functools

    from autorank.models import ModelSpec, small_cnn
    from autorank.workload.data import DigitsData
    from autorank.workload.device import DeviceProfile
    from autorank.workload.workload import Paths, TrainerConfig, Workload

    spec = spec or ModelSpec(functools.partial(small_cnn, width=8))
    data = data or DigitsData(input_size=input_size, batch_size=batch_size)
    paths = Paths(root=str(root), output_dir=str(Path(root) / "out"), cache_dir=str(cache_dir or Path(root) / "cache"))
    return Workload(DeviceProfile("rpi4", 2048, 300, 400, 2.0), spec, data,
                    TrainerConfig(**{"lr": 0.05, **trainer}), paths)


@pytest.fixture(scope="session")
def small_workload():
    """make_small_workload(root, ...): the tests' small Workload builder (module-scoped fixtures
    may use it too)."""
    return make_small_workload


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory):
    """(cache_dir, args): a cache folder (paths.cache_dir=...) holding the base model and profile
    of the small settings `args`, made once per session by a knapsack run of the app, so that a
    slow test of a later step starts where the work begins."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("pretrained")
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", SMOKE, "search=knapsack",
                        f"export.path={root}/plan.yaml"], cwd=root, env={**os.environ, "AUTORANK_ROOT": str(root)},
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / ".cache" / "autorank", [SMOKE]

