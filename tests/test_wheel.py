"""The built wheel is all a user needs: installed into a fresh venv with no source tree, the app
runs from another folder on its packaged configs and the device runner's console script works.

The fresh venv gets the dependencies (torch: 5 GB, not reinstalled) from this interpreter's
site-packages through a .pth line, which puts them on sys.path without running their .pth files:
a dev venv's editable autorank is not what the fresh venv imports (asserted)."""

from __future__ import annotations

import ast
import re
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AUTORANK_ROOT", "PYTHONHOME")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from a copy of the package (not the checkout) installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copytree(ROOT / "autorank", src / "autorank", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # offline: no build isolation (setuptools comes from this venv), no index
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", tmp / "dist", src], cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("autorank-*.whl")
    env = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp)
    assert r.returncode == 0, r.stderr
    python = env / "bin" / "python"
    # the wheel first, while the venv sees nothing else (pip then has no other autorank to replace)
    r = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
             cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    (tmp / "elsewhere").mkdir()
    return env


def test_wheel_holds_the_configs_and_imports_from_the_fresh_venv(venv):
    where = venv.parent / "elsewhere"
    code = ("import autorank, torch; from autorank.app import CONF_DIR; from autorank.search.space import SPACES_DIR;"
            "print(autorank.__file__); print(CONF_DIR); print(sorted(p.stem for p in SPACES_DIR.glob('*.yaml')));"
            "print(torch.__version__)")
    r = _run([venv / "bin" / "python", "-c", code], cwd=where)
    assert r.returncode == 0, r.stderr
    mod, conf, spaces, torch_version = r.stdout.splitlines()
    assert Path(mod).is_relative_to(venv) and not Path(mod).is_relative_to(ROOT)
    assert Path(conf) == Path(mod).parent / "conf" and (Path(conf) / "config.yaml").is_file()
    assert ast.literal_eval(spaces) == sorted(p.stem for p in (ROOT / "autorank" / "conf" / "space").glob("*.yaml"))
    assert torch_version == torch.__version__  # the dependencies are this venv's, not reinstalled
    for group in ("device", "model", "data", "trainer", "paths", "space", "search", "sampler", "tracking"):
        shipped = sorted(p.name for p in (Path(conf) / group).glob("*.yaml"))
        assert shipped and shipped == sorted(p.name for p in (ROOT / "autorank" / "conf" / group).glob("*.yaml"))


def test_wheel_console_scripts_report_bad_input(venv):
    where = venv.parent / "elsewhere"
    r = _run([venv / "bin" / "autorank-device", "nope.yaml", "c.pt", "d.pt"], cwd=where)
    assert r.returncode == 2 and r.stderr.startswith("error: plan file nope.yaml does not exist"), r.stderr
    r = _run([venv / "bin" / "autorank"], cwd=where)  # no device: the profiles come from the package
    assert r.returncode == 2 and "rpi4" in r.stderr and "jetson_nano" in r.stderr, r.stderr


@pytest.mark.slow
def test_wheel_app_and_device_runner_from_another_folder(venv):
    """One trial of the default Optuna job, shrunk, run from a folder without configs; then the
    exported plan fine-tuned by `autorank-device` on the cached base checkpoint."""
    where, root = venv.parent / "run_here", venv.parent / "root"
    where.mkdir()
    plan = root / "plan.yaml"
    r = _run([venv / "bin" / "python", "-m", "autorank", "+device=rpi4", "model=small_cnn", "space=small",
              "data.input_size=16", "data.batch_size=32", "trainer.max_epochs=1", "trainer.pretrain_epochs=1",
              "search.n_trials=1", f"paths.root={root}", f"export.path={plan}"], cwd=where, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert plan.is_file() and "exported plan (trial 0" in r.stdout
    assert not list(where.iterdir())  # everything went under paths.root

    from autorank.plan import Plan
    from autorank.plan.plan import FineTuneSettings

    ft = FineTuneSettings.from_plan(Plan.load(plan))
    assert ft.model_factory == "autorank.models:small_cnn"
    (ckpt,) = (root / ".cache" / "autorank" / "checkpoints").glob("*.pt")
    n_classes, batch = ft.model_kwargs["num_classes"], ft.input_shape[0]
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(batch + 8, 3, 16, 16, generator=g),
                "y": torch.randint(0, n_classes, (batch + 8,), generator=g)}, root / "data.pt")
    r = _run([venv / "bin" / "autorank-device", plan, ckpt, root / "data.pt", "--out", root / "tuned.pt"], cwd=where)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("saved activations per step"))
    measured, predicted = (int(v.replace(",", "")) for v in
                           re.search(r"measured ([\d,]+) bytes, predicted ([\d,]+) bytes", line).groups())
    assert measured == predicted > 0 and (root / "tuned.pt").is_file()
