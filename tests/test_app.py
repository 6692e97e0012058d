"""The Hydra app: every config group composes and instantiates; errors are clear and exit non-zero;
end-to-end runs (marker `slow`) on a small model and tiny data, each in its own tmp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from autorank.app import CONF_DIR, UsageError, device_names, run

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: the smoke preset (conf/experiment/smoke.yaml), a 6 k-parameter CNN on 16 px
# digits, search space `small`.
SMOKE = "+experiment=smoke"


def _compose(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True, overrides=[
            f"paths.root={tmp_path}", f"paths.output_dir={tmp_path}/out", *overrides])


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# device, model, data, trainer and paths: tests/test_configs_workload.py. Here: what the app adds.
SAMPLERS = {"gp": "GPSampler", "nsga2": "NSGAIISampler", "random": "RandomSampler", "tpe": "TPESampler"}


def _instantiate(cfg, node):
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return instantiate(node)


def test_the_app_groups_have_these_options():
    assert _options("search") == ["knapsack", "optuna"]
    assert _options("sampler") == sorted(SAMPLERS)
    assert _options("tracking") == ["mlflow"]


def test_the_smoke_preset_is_these_options_and_the_command_line_wins(tmp_path):
    from omegaconf import OmegaConf

    assert _options("experiment") == ["smoke"]
    explicit = ["model=small_cnn", "data.input_size=16", "data.batch_size=32", "trainer.max_epochs=2",
                "trainer.pretrain_epochs=2", "trainer.steps=6", "space=small"]
    as_dict = lambda cfg: OmegaConf.to_container(cfg, resolve=False)  # noqa: E731
    smoke = as_dict(_compose(tmp_path, ["+device=rpi4", SMOKE]))
    plain = as_dict(_compose(tmp_path, ["+device=rpi4", *explicit]))
    assert smoke.pop("hydra")["runtime"]["choices"]["experiment"] == "smoke"
    plain.pop("hydra")
    assert smoke == plain
    cfg = _compose(tmp_path, ["+device=rpi4", SMOKE, "space=last4", "trainer.steps=20", "data.input_size=24"])
    assert (cfg.space.name, cfg.trainer.steps, cfg.data.input_size, cfg.trainer.max_epochs) == ("last4", 20, 24, 2)


def test_search_options(tmp_path):
    from autorank.search import KnapsackSearch, OptunaSearch
    from autorank.search.space import load_space

    cfg = _compose(tmp_path, ["+device=rpi4"])
    opt = _instantiate(cfg, cfg.search)  # optuna is the default
    assert type(opt) is OptunaSearch and opt.name == "optuna"
    assert type(opt.space) is dict and load_space(opt.space) == load_space("default")
    assert (opt.n_trials, opt.n_trials_total, opt.timeout, opt.warm_start) == (12, True, None, True)
    assert (opt.trial_steps, opt.refit_steps, opt.refit_top, opt.references) == (50, 100, 2, True)
    assert opt.storage == f"sqlite:///{tmp_path}/outputs/optuna.db" and opt.study_name is None
    cfg = _compose(tmp_path, ["+device=rpi4", "search.n_trials=7", "space=last4",
                              "search.storage=sqlite:///x.db", "search.study_name=s1"])
    opt = _instantiate(cfg, cfg.search)
    assert (opt.n_trials, opt.storage, opt.study_name) == (7, "sqlite:///x.db", "s1")
    assert load_space(opt.space).name == "last4" and load_space(opt.space).last == 4
    cfg = _compose(tmp_path, ["+device=rpi4", "search=knapsack", "space=small"])
    ks = _instantiate(cfg, cfg.search)
    assert type(ks) is KnapsackSearch and ks.name == "knapsack" and load_space(ks.space).name == "small"
    assert ks.n_calibration_batches == 2 and ks.max_epochs is None


def _first_suggestion(sampler) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    return study.ask().suggest_float("x", 0.0, 1.0)


@pytest.mark.parametrize("option", sorted(SAMPLERS))
def test_sampler_options_are_the_named_class_and_seeded(tmp_path, option):
    cfg = _compose(tmp_path, ["+device=rpi4", f"sampler={option}", "seed=7"])
    assert cfg.sampler.seed == 7  # seed: ${seed}
    a, b = _instantiate(cfg, cfg.sampler), _instantiate(cfg, cfg.sampler)
    assert type(a).__name__ == SAMPLERS[option]
    other = _instantiate(cfg, {**cfg.sampler, "seed": 8})
    # the seed reaches the sampler: the same seed gives the same first suggestion, another differs
    assert _first_suggestion(a) == _first_suggestion(b) != _first_suggestion(other)


def test_sampler_default_is_tpe(tmp_path):
    cfg = _compose(tmp_path, ["+device=rpi4"])
    s = _instantiate(cfg, cfg.sampler)
    assert type(s).__name__ == "TPESampler" and cfg.sampler.seed == cfg.seed == 0


def test_tracking_option(tmp_path):
    from autorank.tracking import MlflowTracker

    cfg = _compose(tmp_path, ["+device=rpi4"])
    t = _instantiate(cfg, cfg.tracking)
    assert type(t) is MlflowTracker and t.experiment == "autorank" and t.run_name is None
    assert t.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert t.artifact_location == f"{tmp_path}/mlruns/artifacts"
    cfg = _compose(tmp_path, ["+device=rpi4", "tracking.uri=http://127.0.0.1:5000"])
    assert _instantiate(cfg, cfg.tracking).uri == "http://127.0.0.1:5000"


def test_default_workload_binds_on_rpi4(tmp_path):
    """With the DEFAULT model and data (mcunet_like x0.5, 144 px, batch 128) on the 1 GB rpi4, the
    training budget is what the OS and the measured runtime leave; plain backprop of the whole
    network (the default space's plain reference) is over it, counting its kernel copies, as the
    search counts them; ASI on the default space's layers fits."""
    from autorank.cost import predict_peak_training_bytes
    from autorank.cost.process import FIRST_STEP_OVERHEAD_BYTES
    from autorank.plan import Choice, Plan, candidate_layers
    from autorank.search.space import load_space

    cfg = _compose(tmp_path, ["+device=rpi4"])
    assert cfg.model.build._target_.endswith("mcunet_like") and cfg.model.build.width_mult == 0.5
    assert (cfg.data.input_size, cfg.data.batch_size) == (144, 128)
    device = _instantiate(cfg, cfg.device)
    assert device.budget_bytes == int((1024 - device.os_mb - device.runtime_mb) * 2**20 - FIRST_STEP_OVERHEAD_BYTES)
    assert device.process_budget_mb == 1024 - device.os_mb
    spec, data = _instantiate(cfg, cfg.model), _instantiate(cfg, cfg.data)
    model = spec(num_classes=data.num_classes("downstream"))
    x = torch.zeros(cfg.data.batch_size, 3, cfg.data.input_size, cfg.data.input_size)
    names = candidate_layers(model)
    every = predict_peak_training_bytes(model, x, Plan(layers={n: Choice.full() for n in names}, bn="frozen", lean=True))
    assert every.total_bytes + every.kernel_bytes > device.budget_bytes
    assert device.process_peak(every.total_bytes + every.kernel_bytes).total_bytes > device.process_budget_mb * 2**20
    space = load_space(cfg.space)
    picked = space.resolve(model)
    assert picked == names[:8] + names[-4:]
    # ASI at low ranks on every layer of the default space (rank 2 per mode: HOSVD at a low
    # explained-variance level keeps a few components per mode)
    modules = dict(model.named_modules())
    asi = Plan(layers={n: Choice.asi([2] * (4 if isinstance(modules[n], torch.nn.Conv2d) else 2))
                       for n in picked}, bn=space.bn, lean=space.lean)
    peak_asi = predict_peak_training_bytes(model, x, asi)
    assert peak_asi.total_bytes + peak_asi.kernel_bytes < device.budget_bytes


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


def test_cli_unknown_space_option_lists_the_options(tmp_path):
    p = _cli(tmp_path, "+device=rpi4", "space=nosuchspace")
    assert p.returncode != 0
    assert "space/nosuchspace" in p.stderr and all(n in p.stderr for n in ("default", "last4", "small"))


def test_cli_missing_dataset_fails_clearly(tmp_path):
    p = _cli(tmp_path, "+device=rpi4", "data=image_folder", f"data.root={tmp_path}/nowhere",
             SMOKE, "space=default", "search=knapsack")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "nowhere" in p.stderr and "Traceback" not in p.stderr


def _bad_space(tmp_path: Path) -> str:
    path = tmp_path / "wide.yaml"
    path.write_text("last: 2\nlevels: [0.5, 1.5]\n")  # an explained-variance level above 1
    return str(path)


def _narrow_checkpoint(tmp_path: Path) -> str:
    from autorank.models import small_cnn

    path = tmp_path / "narrow.pt"
    torch.save(small_cnn(num_classes=5, width=4).state_dict(), path)  # the model has width 8
    return str(path)


# Each stops before pretraining (the bad value is read first): a few seconds of imports each.
@pytest.mark.parametrize("make_args,expect", [
    (lambda t: [f"model.checkpoint={t}/none.pt"], ["model.checkpoint=", "none.pt", "does not exist"]),
    (lambda t: [f"model.checkpoint={_narrow_checkpoint(t)}"], ["narrow.pt", "does not fit the model"]),
    (lambda t: ["search.space=nosuchspace"], ["nosuchspace", "not found", "default"]),
    (lambda t: [f"space.path={t}/none.yaml"], ["none.yaml", "not found", "space.path="]),
    (lambda t: [f"space.path={_bad_space(t)}"], ["'wide'", "levels must lie in (0, 1]", "1.5"]),
    (lambda t: ["device.budget_mb=-5"], ["rpi4", "device.budget_mb=-5", "a finite number > 0"]),
    (lambda t: ["trainer.feature_cache=ram"], ["trainer.feature_cache", "'ram'"]),
], ids=["missing_checkpoint", "checkpoint_misfit", "unknown_space", "missing_space_file", "invalid_space",
        "negative_budget", "bad_feature_cache"])
def test_cli_bad_value_is_one_clear_line(tmp_path, make_args, expect):
    args = make_args(tmp_path)
    space = ["space=default"] if any(a.startswith(("search.space=", "space.path=")) for a in args) else []
    p = _cli(tmp_path, "+device=rpi4", SMOKE, *space, *args, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "InstantiationException" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("autorank: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    for word in expect:
        assert word in errors[0], (word, errors[0])
    assert "pretraining" not in p.stdout + p.stderr and not (tmp_path / ".cache").exists()


def test_a_bug_keeps_its_traceback():
    """Only config errors are shortened: anything else is re-raised by the unwrapping."""
    from hydra.errors import InstantiationException

    from autorank.app import config_error
    from autorank.errors import ConfigError

    cause = ConfigError("device 'x': training budget -5 MB is not positive")
    wrapped = InstantiationException("Error in call to target")
    wrapped.__cause__ = cause
    assert config_error(wrapped) is cause
    bug = InstantiationException("Error in call to target")
    bug.__cause__ = TypeError("unexpected keyword")
    assert config_error(bug) is None and config_error(KeyError("k")) is None


@pytest.mark.slow
def test_cli_budget_below_minimum_names_the_minimum(tmp_path):
    p = _cli(tmp_path, "+device=rpi4", "device.budget_mb=0.01", SMOKE, "search=knapsack")
    assert p.returncode == 2, p.stderr[-2000:]
    import re

    m = re.search(r"smallest possible plan: ([0-9.]+) MB", p.stderr)
    assert m and float(m.group(1)) > 0.01, p.stderr  # names the minimum, above the budget given
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_knapsack_end_to_end(tmp_path):
    from autorank.plan import Plan, apply_plan

    p = _cli(tmp_path, "+device=rpi4", SMOKE, "search=knapsack", f"export.path={tmp_path}/plan.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.layers, "the knapsack plan trains something"
    # The plan applies to the cached base model with torch alone.
    ckpts = list((tmp_path / ".cache" / "autorank").rglob("*.pt"))
    assert ckpts, "the base checkpoint is cached"
    from autorank.models import small_cnn

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
    p2 = _cli(tmp_path, "+device=rpi4", SMOKE, "search=knapsack", f"export.path={tmp_path}/plan2.yaml")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "pretraining" not in (p2.stdout + p2.stderr)
    assert yaml.safe_load((tmp_path / "plan2.yaml").read_text())["layers"] == \
        yaml.safe_load((tmp_path / "plan.yaml").read_text())["layers"]


@pytest.mark.slow
def test_cli_optuna_end_to_end_and_resume(tmp_path):
    import optuna

    args = ["+device=rpi4", "device.budget_mb=2", SMOKE, "search.trial_steps=4",
            "search.n_trials=8", f"export.path={tmp_path}/plan.yaml"]
    p = _cli(tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8
    assert (tmp_path / "plan.yaml").exists()
    # refit at trainer.steps, reported beside the best plain plan and the references
    refit = study.user_attrs["refit"]
    assert refit and all(v["steps"] == 6 for v in refit.values())
    assert set(study.user_attrs["references"]) == {"plain reference", "head alone"}
    out = " ".join(p.stdout.split())
    assert "refit acc" in out and "unconstrained plain reference" in out and "budget curve" in out
    from autorank.plan import Plan
    plan = Plan.load(tmp_path / "plan.yaml")
    # the best refit plan, with the refit's steps (trainer.steps, not search.trial_steps) and accuracy
    assert plan.meta["finetune"]["max_steps"] == 6 and plan.meta["accuracy_from"] == "refit"
    assert plan.meta["refit_accuracy"] == plan.meta["accuracy"] == refit[str(plan.meta["trial"])]["accuracy"] \
        == max(v["accuracy"] for v in refit.values())
    # the export CLI writes the same file for the same trial
    from autorank.export import main as export_main
    assert export_main(["--storage", storage, "--study", summary.study_name, "--out", str(tmp_path / "cli.yaml")]) == 0
    cli = Plan.load(tmp_path / "cli.yaml")
    assert cli.meta.pop("exported_from")["trial"] == plan.meta["trial"]
    assert (cli.layers, cli.meta, cli.fingerprint) == (plan.layers, plan.meta, plan.fingerprint)
    assert plan.meta["choices"][list(plan.meta["choices"])[-1]] == "full"  # the head rule
    # The same command with more trials continues the same study: nothing lost, nothing repeated.
    p = _cli(tmp_path, *args[:-2], "search.n_trials=10", f"export.path={tmp_path}/plan.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    numbers = [t.number for t in study.trials if t.state.is_finished()]
    assert sorted(numbers) == list(range(10))
