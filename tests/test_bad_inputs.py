"""Every bad input answered before work is done (docs/RELIABILITY.md, `## Bad input`).

Each CLI case runs as a user would (`python -m autorank|autorank.device|autorank.export` in a
subprocess, in a folder of its own holding a stored study, a plan, a checkpoint and data) and
asserts: exit status 2, one error line naming the problem, no traceback, every file that was
there unchanged (sha256), and nothing new but Hydra's own run folder. The subprocesses of the
selected cases run a few at a time in one module fixture (each costs an interpreter start). The
torch-only API cases assert the one exception type, PlanError (a ValueError).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from autorank.models import small_cnn
from autorank.plan import Choice, Plan, PlanError, apply_plan

KW = {"num_classes": 4}
SMALL = ["+experiment=smoke", "search.n_trials=3"]  # conf/experiment/smoke.yaml; a case's own options win
HYDRA_FILES = re.compile(r"outputs/[^/]+/[^/]+/(\.hydra/[^/]+\.yaml|[^/]+\.log)$")


def _plan(meta_kw=KW) -> Plan:
    return Plan({"conv3": Choice.asi([4, 8, 2, 2]), "fc": Choice.full()},
                meta={"model": {"factory": "autorank.models:small_cnn", "kwargs": meta_kw},
                      "input_shape": [8, 3, 16, 16]})


def _template(folder: Path) -> Path:
    """The files every case folder starts with: a stored study, a plan, a checkpoint, data, and
    the bad files the cases name."""
    import optuna

    torch.manual_seed(0)
    (folder / "outputs").mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder}/outputs/optuna.db", study_name="kept")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    _plan().save(folder / "plan.yaml", model=small_cnn(**KW))
    Plan({"fc": Choice.frozen()}, meta=_plan().meta).save(folder / "frozen_plan.yaml")
    torch.save(small_cnn(**KW).state_dict(), folder / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(16, 3, 16, 16, generator=g), "y": torch.randint(0, 4, (16,), generator=g)},
               folder / "data.pt")
    (folder / "rand.bin").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))
    (folder / "empty.yaml").write_text("\n  \n")
    (folder / "list.yaml").write_text("- last: 2\n- levels: [0.8]\n")
    (folder / "malformed.yaml").write_text("last: 2\nlevels: [0.8, 0.9\n")
    (folder / "adir").mkdir()
    (folder / "afile").write_text("a file, not a folder\n")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Cli:
    tool: str  # app | device | export
    args: tuple[str, ...]  # {d}: the case folder
    expect: tuple[str, ...]  # words of the error line

    def argv(self, d: Path) -> list[str]:
        args = [a.replace("{d}", str(d)) for a in self.args]
        if self.tool == "app":
            keys = {a.split("=", 1)[0] for a in args}
            base = [a for a in SMALL + [f"export.path={d}/plan.yaml"] if a.split("=", 1)[0] not in keys]
            return [sys.executable, "-m", "autorank", "+device=rpi4", *base, *args]
        if self.tool == "device":
            return [sys.executable, "-m", "autorank.device", *args]
        return [sys.executable, "-m", "autorank.export", "--storage", f"sqlite:///{d}/outputs/optuna.db",
                "--study", "kept", *args]


def app(*args: str, expect: tuple[str, ...]) -> Cli:
    return Cli("app", args, expect)


def device(*args: str, expect: tuple[str, ...], files=("{d}/plan.yaml", "{d}/ckpt.pt", "{d}/data.pt")) -> Cli:
    return Cli("device", (*files, *args), expect)


def export(*args: str, expect: tuple[str, ...]) -> Cli:
    return Cli("export", args, expect)


WHOLE = "a whole number >= 1"
CASES: dict[str, Cli] = {
    # the app: each stops before torch is imported (autorank.validate), but the checkpoint's bytes
    "max_epochs=-1": app("trainer.max_epochs=-1", expect=("trainer.max_epochs=-1", WHOLE, "no limit")),
    "max_epochs=0": app("trainer.max_epochs=0", expect=("trainer.max_epochs=0", WHOLE)),
    "steps=0": app("trainer.steps=0", expect=("trainer.steps=0", WHOLE, "or null")),
    "n_trials=0": app("search.n_trials=0", expect=("search.n_trials=0", WHOLE)),
    "n_trials=text": app("search.n_trials=many", expect=("search.n_trials='many'", WHOLE)),
    "n_trials=2.5": app("search.n_trials=2.5", expect=("search.n_trials=2.5", WHOLE)),
    "timeout<0": app("search.timeout=-1", expect=("search.timeout=-1", "a finite number > 0 or null")),
    "trial_steps=0": app("search.trial_steps=0", expect=("search.trial_steps=0", WHOLE)),
    "budget=inf": app("device.budget_mb=inf", expect=("device.budget_mb=inf", "a finite number > 0")),
    "budget=nan": app("device.budget_mb=nan", expect=("device.budget_mb=nan", "a finite number > 0")),
    "budget=0": app("device.budget_mb=0", expect=("device.budget_mb=0", "a finite number > 0")),
    "ram=inf": app("device.ram_mb=inf", expect=("device.ram_mb=inf", "a finite number > 0")),
    "lr=nan": app("trainer.lr=nan", expect=("trainer.lr=nan", "a finite number > 0")),
    "batch_size=0": app("data.batch_size=0", expect=("data.batch_size=0", WHOLE)),
    "input_size=0": app("data.input_size=0", expect=("data.input_size=0", WHOLE)),
    "space empty": app("space.path={d}/empty.yaml", expect=("empty.yaml is empty", "search-space keys")),
    "space list": app("space.path={d}/list.yaml", expect=("list.yaml holds a list", "search-space keys")),
    "space binary": app("space.path={d}/rand.bin", expect=("rand.bin is binary", "search-space keys")),
    "space directory": app("space.path={d}/adir", expect=("adir is a directory", "search-space keys")),
    "space malformed": app("space.path={d}/malformed.yaml", expect=("malformed.yaml is not valid YAML", "line 3")),
    "export.path directory": app("export.path={d}/adir", expect=("export.path=", "adir is a directory")),
    "export.path under a file": app("export.path={d}/afile/plan.yaml", expect=("afile is a file, not a folder",)),
    "export.path unwritable": app("export.path=/proc/autorank/plan.yaml",
                                  expect=("export.path=/proc/autorank/plan.yaml cannot be written",)),
    "checkpoint directory": app("model.checkpoint={d}/adir", expect=("model.checkpoint=", "adir is a directory")),
    "checkpoint random bytes": app("model.checkpoint={d}/rand.bin",
                                   expect=("rand.bin", "random bytes", "torch.save(model.state_dict(), path)")),
    "storage env unset": app("search.storage=${oc.env:AUTORANK_TEST_UNSET_STORAGE}",
                             expect=("search.storage cannot be read", "AUTORANK_TEST_UNSET_STORAGE")),
    # the device runner: options checked before any file is read
    "device --batch-size 0": device("--batch-size", "0", expect=("--batch-size must be >= 1, got 0",)),
    "device --epochs -1": device("--epochs", "-1", expect=("--epochs must be >= 0", "got -1")),
    "device --lr nan": device("--lr", "nan", expect=("--lr must be a finite number > 0, got nan",)),
    "device --lr -0.1": device("--lr", "-0.1", expect=("--lr must be a finite number > 0, got -0.1",)),
    "device --momentum 1.5": device("--momentum", "1.5", expect=("--momentum must lie in [0, 1)", "1.5")),
    "device checkpoint directory": device(expect=("checkpoint", "adir is a directory"),
                                          files=("{d}/plan.yaml", "{d}/adir", "{d}/data.pt")),
    "device plan directory": device(expect=("plan", "adir is a directory"),
                                    files=("{d}/adir", "{d}/ckpt.pt", "{d}/data.pt")),
    "device data directory": device(expect=("data folder", "adir needs at least 2 class subfolders"),
                                    files=("{d}/plan.yaml", "{d}/ckpt.pt", "{d}/adir")),
    "device checkpoint random bytes": device(expect=("cannot read checkpoint", "rand.bin", "random bytes"),
                                             files=("{d}/plan.yaml", "{d}/rand.bin", "{d}/data.pt")),
    "device plan binary": device(expect=("plan file", "rand.bin is binary"),
                                 files=("{d}/rand.bin", "{d}/ckpt.pt", "{d}/data.pt")),
    "device plan empty": device(expect=("plan file", "empty.yaml is empty"),
                                files=("{d}/empty.yaml", "{d}/ckpt.pt", "{d}/data.pt")),
    "device plan trains nothing": device(expect=("trains no layer", "at least one trained layer"),
                                         files=("{d}/frozen_plan.yaml", "{d}/ckpt.pt", "{d}/data.pt")),
    "device --out directory": device("--out", "{d}/adir", expect=("--out", "adir is a directory")),
    # the export CLI: --out checked before the study is read
    "export missing db": Cli("export", ("--storage", "sqlite:///{d}/none.db", "--study", "kept"),
                             expect=("no sqlite database at", "none.db")),
    "export unknown study": export("--study", "nope", expect=("study 'nope' not found", "'kept'")),
    "export --out directory": export("--out", "{d}/adir", expect=("--out", "adir is a directory")),
    "export --out unwritable": export("--out", "/proc/autorank/plan.yaml", expect=("cannot be written",)),
}


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """case -> (folder, files before, CompletedProcess), for the selected cases only, run three
    at a time."""
    wanted = sorted({it.callspec.params["case"] for it in request.session.items
                     if getattr(it, "callspec", None) and it.callspec.params.get("case") in CASES})
    base = tmp_path_factory.mktemp("bad_inputs")
    template = _template(base / "template")
    env = {k: v for k, v in os.environ.items() if k != "AUTORANK_TEST_UNSET_STORAGE"}
    jobs = {}
    for i, case in enumerate(wanted):
        folder = base / f"case{i:02d}"
        shutil.copytree(template, folder)
        jobs[case] = (folder, _snapshot(folder), CASES[case].argv(folder))

    def one(case):
        folder, _, argv = jobs[case]
        return subprocess.run(argv, cwd=folder, env={**env, "AUTORANK_ROOT": str(folder)}, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(wanted, pool.map(one, wanted)))
    return {case: (jobs[case][0], jobs[case][1], done[case]) for case in wanted}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(cli_runs, case):
    folder, before, p = cli_runs[case]
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    prefix = "autorank: error: " if CASES[case].tool == "app" else "error: "
    errors = [line for line in p.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, p.stderr[-3000:]
    for word in CASES[case].expect:
        assert word in errors[0], (word, errors[0])
    if CASES[case].tool == "app":
        assert "pretraining" not in out and not (folder / ".cache").exists()
    after = _snapshot(folder)
    assert {k: after.get(k) for k in before} == before, "a stored file changed"
    new = sorted(set(after) - set(before))
    assert all(HYDRA_FILES.match(k) for k in new), new


# -- the torch-only API: one exception type, PlanError (a ValueError), for every bad plan --------
def _bad_plan_file(tmp: Path, name: str, content: bytes | str | None) -> Path:
    p = tmp / name
    if content is None:
        p.mkdir()
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


PLAN_FILES = {
    "missing": ("none.yaml", "", "does not exist"),  # "" : not written
    "directory": ("adir.yaml", None, "is a directory"),
    "binary": ("bin.yaml", bytes(range(256)), "is binary"),
    "empty": ("empty.yaml", "", "is empty"),
    "malformed YAML": ("bad.yaml", "layers: {conv3: asi[4,\n", "is not valid YAML"),
    "malformed JSON": ("bad.json", '{"layers": ', "is not valid JSON"),
    "a list": ("list.yaml", "- frozen\n- full\n", "holds a list"),
    "a number": ("num.yaml", "3\n", "holds a int"),
    "no format_version": ("nover.yaml", "layers: {fc: full}\n", "format_version None"),
    "unknown keys": ("keys.yaml", "format_version: 1\nlayer: {fc: full}\n", "unknown plan keys: ['layer']"),
    "bad choice": ("choice.yaml", "format_version: 1\nlayers: {fc: 'asi[a,b]'}\n", "asi ranks are whole numbers"),
    "layers a list": ("layers.yaml", "format_version: 1\nlayers: [fc, conv3]\n", "'layers' must be a dict"),
    "layer a number": ("num_layer.yaml", "format_version: 1\nlayers: {fc: 3}\n", "plan layer 'fc'"),
    "bad fingerprint": ("fp.yaml", "format_version: 1\nlayers: {fc: full}\nfingerprint: {layers: 3}\n",
                        "fingerprint is malformed"),
}


@pytest.mark.parametrize("case", list(PLAN_FILES))
def test_api_bad_plan_file_is_a_plan_error(tmp_path, case):
    name, content, words = PLAN_FILES[case]
    path = tmp_path / name if case == "missing" else _bad_plan_file(tmp_path, name, content)
    before = _snapshot(tmp_path)
    model = small_cnn(**KW)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: Plan.load(path), lambda: apply_plan(model, path)):
        with pytest.raises(PlanError, match=re.escape(words)) as e:
            call()
        assert isinstance(e.value, ValueError) and name in str(e.value)
    assert _snapshot(tmp_path) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(p.requires_grad is False for p in model.parameters()), "the model was left half-planned"


@pytest.mark.parametrize("plan, words", [
    (Plan({"fc": Choice.frozen(), "conv3": Choice.frozen()}), "trains no layer"),
    (Plan(), "trains no layer"),
    (Plan({"layer9": Choice.full()}), "'layer9', which is not a conv/linear layer"),
    (_plan().for_model(small_cnn(num_classes=7)), "first mismatched layer 'fc'"),
], ids=["all frozen", "empty plan", "unknown layer", "fingerprint of another model"])
def test_api_apply_plan_refuses_what_cannot_train(plan, words):
    model = small_cnn(**KW)
    with pytest.raises(PlanError, match=re.escape(words)):
        apply_plan(model, plan)
    assert all(p.requires_grad for p in model.parameters()), "the model is as it was"
    # the cost model still prices a plan that trains nothing (the reference of the profile)
    if not plan.trained_layers():
        apply_plan(model, plan, allow_untrained=True)
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("text, words", [
    ("asi[0,4]", "asi ranks must be >= 1"), ("asi[]", "asi needs ranks"), ("hosvd[1.5]", "eps in (0, 1]"),
    ("hosvd[x]", "hosvd needs eps in (0, 1]"), ("lora[x]", "lora needs one rank"),
    ("lora[4]+asi[]", "+asi needs ranks"), ("lora[0]", "rank >= 1"), ("banana", "cannot parse choice"),
])
def test_api_bad_choice_is_a_plan_error(text, words):
    with pytest.raises(PlanError, match=re.escape(words)):
        Choice.parse(text)


def test_the_budget_checks_reject_non_finite_values_in_the_api_too():
    from autorank.errors import ConfigError
    from autorank.workload.device import DeviceProfile

    for kw in ({"budget_mb": math.inf}, {"budget_mb": math.nan}, {"ram_mb": math.nan}):
        args = {"name": "d", "ram_mb": 1024, "os_mb": 300, "runtime_mb": 400, "gflops_fp32": 2.0, **kw}
        with pytest.raises(ConfigError, match="must be finite numbers"):
            DeviceProfile(**args)
    assert DeviceProfile("d", 1024, 300, 400, 2.0, budget_mb=100).budget_bytes == 100 * 2**20


@pytest.mark.slow
def test_budget_below_the_smallest_plan_fails_before_any_trial(tmp_path, pretrained_cache):
    """The profile knows the smallest plan's peak: exit 2 naming it and the override, before the
    study, a trial or an MLflow run exists."""
    cache, args = pretrained_cache
    p = subprocess.run([sys.executable, "-m", "autorank", "+device=rpi4", *args, f"paths.cache_dir={cache}",
                        "device.budget_mb=0.05", "search.n_trials=3", "search.trial_steps=4"],
                       cwd=tmp_path, env={**os.environ, "AUTORANK_ROOT": str(tmp_path)}, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "pretraining" not in p.stdout + p.stderr
    (err,) = [line for line in p.stderr.splitlines() if line.startswith("autorank: error:")]
    m = re.search(r"smallest possible plan: ([0-9.]+) MB .* device\.budget_mb=([0-9.]+)", err)
    assert m, err
    assert 0.05 < float(m.group(1)) <= float(m.group(2)) < float(m.group(1)) + 0.011
    assert not (tmp_path / "outputs" / "optuna.db").exists() and not (tmp_path / "mlruns").exists()
