"""The Hydra app: every config group composes and instantiates; errors are clear and exit non-zero;
end-to-end runs (marker `slow`) on a small model and tiny data, each in its own tmp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from autorank.app import CONF_DIR, UsageError, device_names, run

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ["device", "model", "data", "trainer", "search", "sampler", "tracking", "paths"]
# Small and fast: a 6 k-parameter CNN on 16 px digits.
SMALL = ["model=small_cnn", "data.input_size=16", "data.batch_size=32", "trainer.max_epochs=2",
         "trainer.pretrain_epochs=2"]


def _compose(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True, overrides=[
            f"paths.root={tmp_path}", f"paths.output_dir={tmp_path}/out", *overrides])


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    prefix = "+" if group == "device" else ""
    cfg = _compose(tmp_path, [f"{prefix}{group}={option}"] + ([] if group == "device" else ["+device=rpi4"]))
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    obj = instantiate(cfg[group])
    assert obj is not None
    if group == "device":
        assert obj.name == option
        assert obj.budget_bytes == (obj.ram_mb - obj.reserved_mb) * 2**20


def test_device_budget_override(tmp_path):
    cfg = _compose(tmp_path, ["+device=rpi4", "device.budget_mb=900"])
    assert instantiate(cfg.device).budget_bytes == 900 * 2**20


def test_device_profiles_listed():
    assert {"rpi4", "rpi5", "jetson_nano", "jetson_orin_nano", "phone"} <= set(device_names())


def test_run_without_device_is_a_usage_error(tmp_path):
    cfg = _compose(tmp_path, [])
    with pytest.raises(UsageError, match=r"\+device=rpi4"):
        run(cfg)


def _cli(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTORANK_ROOT": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "autorank", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_without_device_lists_profiles(tmp_path):
    p = _cli(tmp_path)
    assert p.returncode == 2
    for name in ("rpi4", "rpi5", "jetson_nano", "phone"):
        assert name in p.stderr
    assert "python -m autorank +device=rpi4" in p.stderr


def test_cli_unknown_device_fails(tmp_path):
    p = _cli(tmp_path, "+device=commodore64")
    assert p.returncode != 0
    assert "commodore64" in p.stderr and "rpi4" in p.stderr


def test_cli_missing_dataset_fails_clearly(tmp_path):
    p = _cli(tmp_path, "+device=rpi4", "data=image_folder", f"data.root={tmp_path}/nowhere",
             *SMALL, "search=knapsack")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "nowhere" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_budget_below_minimum_names_the_minimum(tmp_path):
    p = _cli(tmp_path, "+device=rpi4", "device.budget_mb=0.01", *SMALL, "search=knapsack",
             "search.space=small")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "MB" in p.stderr and "minimum" in p.stderr.lower()
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_knapsack_end_to_end(tmp_path):
    from autorank.plan import Plan, apply_plan

    p = _cli(tmp_path, "+device=rpi4", *SMALL, "search=knapsack", "search.space=small",
             f"export.path={tmp_path}/plan.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.layers, "the knapsack plan trains something"
    # The plan applies to the cached base model with torch alone.
    ckpts = list((tmp_path / ".cache" / "autorank").rglob("*.pt"))
    assert ckpts, "the base checkpoint is cached"
    from autorank.workload.models import small_cnn

    import torch

    model = small_cnn(num_classes=5, width=8)
    apply_plan(model, tmp_path / "plan.yaml")
    assert any(p.requires_grad for p in model.parameters())
    out = model(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 5)
    # The run is in MLflow.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert 0.0 <= runs[0].data.metrics["val_accuracy"] <= 1.0
    # Second run: checkpoint and profile come from the cache (no pretraining line).
    p2 = _cli(tmp_path, "+device=rpi4", *SMALL, "search=knapsack", "search.space=small",
              f"export.path={tmp_path}/plan2.yaml")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "pretraining" not in (p2.stdout + p2.stderr)
    assert yaml.safe_load((tmp_path / "plan2.yaml").read_text())["layers"] == \
        yaml.safe_load((tmp_path / "plan.yaml").read_text())["layers"]


@pytest.mark.slow
def test_cli_optuna_end_to_end_and_resume(tmp_path):
    import optuna

    args = ["+device=rpi4", "device.budget_mb=2", *SMALL, "search.space=small",
            "search.n_trials=8", f"export.path={tmp_path}/plan.yaml"]
    p = _cli(tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8
    assert (tmp_path / "plan.yaml").exists()
    # The same command with more trials continues the same study: nothing lost, nothing repeated.
    p = _cli(tmp_path, *args[:-2], "search.n_trials=10", f"export.path={tmp_path}/plan.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    numbers = [t.number for t in study.trials if t.state.is_finished()]
    assert sorted(numbers) == list(range(10))
