"""The device runner under a hard memory limit (a memory cgroup, autorank.device.cap), as a
device's RAM limits it: a plan predicted to fit completes; a plan predicted above the limit is
refused before training with one line naming both figures (exit 3); one forced to run anyway is
killed by the kernel and the supervisor says so in one line (exit 4). mcunet_like x0.5 at 112 px,
batch 128 (the default job's size), an ASI plan and the same region trained plainly."""

import re
import subprocess
import sys

import pytest
import torch

from autorank.device.cap import CgroupUnavailable, MemoryCap
from autorank.models import mcunet_like
from autorank.plan import Choice, Plan, candidate_layers

MB = 2**20
KW = {"num_classes": 5, "width_mult": 0.5}
pytestmark = pytest.mark.slow


def _input_shapes(model, x):
    shapes, hooks = {}, []
    for name in candidate_layers(model):
        m = model.get_submodule(name)
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: shapes.update({n: tuple(a[0].shape)})))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    try:
        MemoryCap(64 * MB).remove()
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup here: {e}")
    d = tmp_path_factory.mktemp("cap")
    torch.manual_seed(0)
    model = mcunet_like(**KW)
    torch.save(model.state_dict(), d / "ckpt.pt")
    names = candidate_layers(model)
    region = names[4:]  # a deep region: its activations dominate the tensors
    shapes = _input_shapes(model, torch.zeros(1, 3, 112, 112))
    meta = {"model": {"factory": "autorank.models:mcunet_like", "kwargs": KW}, "input_shape": [128, 3, 112, 112],
            "lr": 0.01}
    asi = {n: (Choice.asi([128, *[max(1, s // 4) for s in shapes[n][1:]]]) if len(shapes[n]) == 4 else Choice.full())
           for n in region}
    Plan(asi, meta=meta).save(d / "asi.yaml", model=model)
    Plan({n: Choice.full() for n in region}, meta=meta).save(d / "plain.yaml", model=model)
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g),
                "y": torch.randint(0, 5, (256,), generator=g)}, d / "data.pt")
    return d


def _device(d, plan, *extra):
    return [sys.executable, "-m", "autorank.device", str(d / plan), str(d / "ckpt.pt"), str(d / "data.pt"), *extra]


def _figures(d, plan):
    """The runner's own prediction and its ready memory, from a run that trains nothing."""
    r = subprocess.run(_device(d, plan, "--epochs", "0"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    pred = int(re.search(r"predicted process peak (\d+) MB", r.stdout).group(1))
    anon = int(re.search(r"ready to train: RSS \d+ MB \(anonymous (\d+) MB", r.stdout).group(1))
    tensors = float(re.search(r"\+ training ([\d.]+) MB", r.stdout).group(1))
    return pred, anon, tensors


def test_a_plan_that_fits_completes_and_one_that_does_not_is_stopped_in_one_line(files):
    asi_mb, _, asi_t = _figures(files, "asi.yaml")
    plain_mb, plain_anon, plain_t = _figures(files, "plain.yaml")
    assert plain_t - asi_t > 100  # the plans differ by more than the noise of a process's memory
    cap = (asi_mb + plain_mb) // 2
    with MemoryCap(cap * MB) as c:
        ok = c.run(_device(files, "asi.yaml"), capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0 and ok.oom_kills == 0, ok.stderr[-2000:]
    assert ok.peak_bytes <= cap * MB
    with MemoryCap(cap * MB) as c:
        r = c.run(_device(files, "plain.yaml"), capture_output=True, text=True, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 3 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    needed = int(re.search(r"needs about (\d+) MB", errors[0]).group(1))
    assert abs(needed - plain_mb) <= 5 and f"may use {cap} MB" in errors[0]  # its ready memory varies by an MB
    # forced to train under a limit below its anonymous memory: the kernel kills the runner, the
    # supervisor says so in one line
    low = plain_anon + int(plain_t) // 3
    with MemoryCap(low * MB) as c:
        r = c.run(_device(files, "plain.yaml", "--ignore-memory-check"), capture_output=True, text=True, timeout=900)
    kills = r.oom_kills
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 4 and kills >= 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "SIGKILL" in errors[0] and "out of memory" in errors[0]
