"""The device runner's data (memory-mapped tensor files, image folders) and its process memory
model: batches equal the search's preprocessing, the data set's size stays out of resident memory,
the memory figures read from /proc and a cgroup, the process prediction's arithmetic."""

import mmap
import subprocess
import sys

import pytest
import torch

from autorank.cost.process import FIRST_STEP_OVERHEAD_BYTES, ProcessPrediction
from autorank.device.data import DataError, normalise_images, open_data
from autorank.device.guard import killed_line
from autorank.device.memory import MB, cgroup_limit, memory_allowed, read_status
from autorank.workload.device import DeviceProfile
from autorank.workload.imagedata import BatchTransform

SHAPE = [4, 3, 16, 16]


def test_uint8_batches_equal_the_searchs_preprocessing(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(10) % 3
    torch.save({"x": x, "y": y, "x_val": x[:4].clone(), "y_val": y[:4].clone()}, tmp_path / "d.pt")
    data = open_data(tmp_path / "d.pt", SHAPE)
    assert "memory-mapped" in data.source and data.kind == "class" and len(data.val) == 4
    idx = torch.tensor([7, 2, 5])
    xb, yb = data.train.batch(idx)
    order = idx.sort().values  # a mapped file is read forwards
    expected = BatchTransform(16).images(x[order])
    assert xb.shape == (3, 3, 16, 16) and torch.equal(yb, y[order])
    torch.testing.assert_close(xb, expected, rtol=0, atol=1e-6)
    # float images in [0, 1] and their uint8 form normalise to within one 8-bit step
    xf = torch.rand(2, 3, 5, 5, generator=g)
    diff = normalise_images(xf, (7, 7)) - normalise_images((xf * 255).round().to(torch.uint8), (7, 7))
    assert diff.abs().max() <= 2 / 255 + 1e-6


def test_float_data_is_used_as_it_is_and_tokens_stay_integers(tmp_path):
    x = torch.randn(6, 3, 16, 16)
    torch.save((x, torch.arange(6) % 2), tmp_path / "f.pt")
    xb, _ = open_data(tmp_path / "f.pt", SHAPE).train.batch(torch.tensor([4, 1]))
    assert torch.equal(xb, x[[1, 4]])
    tok = torch.randint(0, 50, (5, 9))
    torch.save({"x": tok, "y": tok.roll(-1, 1)}, tmp_path / "t.pt")
    data = open_data(tmp_path / "t.pt", [2, 9])
    xb, yb = data.train.batch(torch.tensor([3]))
    assert data.kind == "token" and xb.dtype == torch.int64 and torch.equal(yb, tok.roll(-1, 1)[[3]])


MAPPED = r"""
import sys, torch
from autorank.device.memory import MB, read_status, set_allocator_policy
from autorank.device.data import open_data
set_allocator_policy()
n = 2048
torch.save({"x": torch.randint(0, 256, (n, 1, 256, 256), dtype=torch.uint8), "y": torch.zeros(n, dtype=torch.int64)},
           sys.argv[1])
data = open_data(sys.argv[1], [64, 1, 256, 256])
before = read_status()
grown = file = 0
for i in range(0, n, 64):
    data.train.batch(torch.arange(i, i + 64))
    data.train.release()
    now = read_status()
    grown, file = max(grown, now["VmRSS"] - before["VmRSS"]), max(file, now["RssFile"] - before["RssFile"])
print(grown / MB, file / MB)
"""


def test_a_mapped_data_set_does_not_stay_resident(tmp_path):
    """128 MiB of uint8 images read whole, batch by batch, in a fresh process with the runner's
    allocator policy: resident memory grows by about one batch, not by the file (the pages are
    handed back after each batch)."""
    r = subprocess.run([sys.executable, "-c", MAPPED, str(tmp_path / "big.pt")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grown, file = (float(v) for v in r.stdout.split())
    assert grown < 40, grown  # the file is 128 MiB; a float batch is 16 MiB
    if hasattr(mmap, "MADV_DONTNEED"):
        assert file < 20, file


def test_image_folder_reads_classes_and_refuses_undecodable_files(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for c, colour in (("cat", 0), ("dog", 255)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20 + i, 10), (colour, colour, colour)).save(tmp_path / split / c / f"{i}.png")
    data = open_data(tmp_path, SHAPE)
    assert len(data.train) == 6 and len(data.val) == 6 and "2 classes" in data.source
    xb, yb = data.train.batch(torch.tensor([0, 5]))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]
    assert torch.allclose(xb[0], torch.full_like(xb[0], -1.0)) and torch.allclose(xb[1], torch.ones_like(xb[1]))
    (tmp_path / "train" / "dog" / "9.png").write_bytes(b"not an image")
    data = open_data(tmp_path, SHAPE)
    with pytest.raises(DataError, match="cannot decode image .*9.png"):
        data.train.batch(torch.arange(len(data.train)))
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="at least 2 class subfolders"):
        open_data(tmp_path / "one", SHAPE)


SAMPLER = r"""
import torch
from autorank.device.memory import MB, PeakSampler, read_status, set_allocator_policy
set_allocator_policy()
with PeakSampler(interval_s=0.005) as mem:
    base = read_status()["RssAnon"]
    t = torch.ones(64 * MB // 4)  # 64 MiB, touched
    t.add_(1)
    mem.sample()
    del t
after = read_status()["RssAnon"]
print((mem.peaks.anon - base) / MB, (after - base) / MB, mem.peaks.hwm >= mem.peaks.rss > 0)
"""


def test_peak_sampler_sees_an_allocation_and_limits_are_read():
    r = subprocess.run([sys.executable, "-c", SAMPLER], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, after, ordered = r.stdout.split()
    assert float(peak) >= 60 and float(after) < 8 and ordered == "True"  # freed 64 MiB went back at once
    allowed = memory_allowed()
    assert allowed is not None and allowed[0] > read_status()["VmRSS"]
    limit = cgroup_limit()
    assert limit is None or limit[0] > 0


def test_process_prediction_and_device_budget_add_up():
    p = ProcessPrediction.from_ready(400 * MB, 150 * MB, weights_bytes=10 * MB)
    assert p.runtime_bytes == 390 * MB and p.total_bytes == 390 * MB + 150 * MB + FIRST_STEP_OVERHEAD_BYTES
    dev = DeviceProfile("d", ram_mb=1024, os_mb=300, runtime_mb=250, gflops_fp32=2.0)
    assert dev.process_budget_mb == 724
    assert dev.budget_bytes == int((1024 - 300 - 250) * MB - FIRST_STEP_OVERHEAD_BYTES)
    # a plan exactly at the training budget is a process exactly at the process budget
    assert abs(dev.process_peak(dev.budget_bytes).total_bytes - dev.process_budget_mb * MB) <= 1
    line = killed_line({"phase": "training", "predicted_bytes": 600 * MB, "allowed": [550 * MB, "the cgroup"]})
    assert "SIGKILL" in line and "training" in line and "600 MB" in line and "550 MB" in line


def _convnet():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(32 * 16 * 16, 10))


@pytest.mark.parametrize("layers, scratch_counts", [(["0", "3", "5", "8"], True), (["5", "8"], True),
                                                    (["3", "8"], False), (["8"], True)])
def test_training_bytes_meet_the_cpu_allocators_peak(layers, scratch_counts):
    """The predicted training peak with the convolutions' scratch (PeakMemory.training_bytes) meets
    what the CPU allocator really handed out over a step (every allocation inside a kernel
    included: torch.profiler's events) within 1%, where the tensors alone fall short."""
    from autorank.cost import predict_peak_training_bytes
    from autorank.cost.live import allocator_peak_bytes, measure_peak_training
    from autorank.plan import Choice, Plan, apply_plan

    torch.manual_seed(0)
    model = _convnet().eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    plan = Plan({n: Choice.full() for n in layers}, lean=False)
    pred = predict_peak_training_bytes(model, x, plan)
    apply_plan(model, plan)
    live = measure_peak_training(model, x, y)
    real = live.resident_bytes + allocator_peak_bytes(model, x, y)
    assert pred.total_bytes == live.peak_bytes  # the tensors: exact
    assert abs(pred.training_bytes - real) <= 0.01 * real, (pred.training_bytes, real)
    assert pred.kernel_bytes == pred.training_bytes - pred.total_bytes >= 0
    if scratch_counts:  # the scratch is no rounding error here
        assert real - pred.total_bytes > 0.05 * real


def test_scratch_rule_of_a_convolution():
    """cpu_kernel_scratch_bytes, by the rule: forward max(input, output); backward max(grad_output,
    input) for the input's gradient (2 x input when strided), grad_output + input for the weight's."""
    from autorank.cost.live import cpu_kernel_scratch_bytes

    conv, bwd = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
    x, w, out = torch.zeros(2, 4, 8, 8), torch.zeros(6, 4, 3, 3), torch.zeros(2, 6, 4, 4)
    xb, ob = 2 * 4 * 64 * 4, 2 * 6 * 16 * 4
    assert cpu_kernel_scratch_bytes(conv, (x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1), out) == max(xb, ob)
    args = lambda mask: (out, x, w, [6], [2, 2], [1, 1], [1, 1], False, [0, 0], 1, mask)  # noqa: E731
    assert cpu_kernel_scratch_bytes(bwd, args([True, False, False]), None) == max(ob, 2 * xb)
    assert cpu_kernel_scratch_bytes(bwd, args([False, True, True]), None) == ob + xb
    assert cpu_kernel_scratch_bytes(bwd, args([True, True, True]), None) == max(2 * xb, ob + xb)
    assert cpu_kernel_scratch_bytes(bwd, args([False, False, False]), None) == 0
    unstrided = (out, x, w, [6], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])
    assert cpu_kernel_scratch_bytes(bwd, unstrided, None) == max(ob, xb)
    assert cpu_kernel_scratch_bytes(torch.ops.aten.mm.default, (x, x), out) == 0


def test_the_runners_sgd_is_torch_optim_sgd():
    from autorank.device.sgd import SGD

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    b[0].weight.requires_grad_(False)  # a frozen parameter has no gradient and is skipped
    a[0].weight.requires_grad_(False)
    ours = SGD([p for p in a.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(5):
        x = torch.randn(4, 6)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert all(p.grad is not None for p in ours.params)
    ours.zero_grad()
    assert all(p.grad is None for p in ours.params)


def test_the_supervisor_imports_no_torch():
    """autorank-device's parent process stays small: the guard, the memory figures, the status
    file and the cgroup tool import the standard library only."""
    code = ("import sys, autorank.device.guard, autorank.device.memory, autorank.device.status, "
            "autorank.device.cap; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'yaml')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr + r.stdout


def test_model_runtime_joins_the_device_runtime():
    """A model config's runtime_mb (torchvision models: numpy and Pillow come with it) adds to the
    device's runtime: the training budget shrinks and the predicted process peak grows by it."""
    import functools

    from autorank.errors import ConfigError
    from autorank.models import ModelSpec, small_cnn
    from autorank.workload import DeviceProfile
    from autorank.workload.data import DigitsData

    dev = DeviceProfile(name="d", ram_mb=1024, os_mb=300, runtime_mb=240, gflops_fp32=2.0,
                        sources={"runtime_mb": "measured"})
    spec = ModelSpec(functools.partial(small_cnn, width=8), runtime_mb=60, runtime_source="arm64 root")
    other = dev.with_model_runtime(spec.name, spec.runtime_mb, spec.runtime_source)
    assert other.runtime_mb == 300 and dev.runtime_mb == 240  # the profile itself is unchanged
    assert dev.budget_bytes - other.budget_bytes == 60 * 2**20
    assert other.process_peak(10 * 2**20).total_bytes - dev.process_peak(10 * 2**20).total_bytes == 60 * 2**20
    assert "240 MB (measured) + 60 MB for small_cnn (arm64 root)" == other.sources["runtime_mb"]
    assert dev.with_model_runtime("m", 0) is dev
    for bad in (-1, float("nan"), True, "60"):
        with pytest.raises(ConfigError, match="runtime_mb"):
            dev.with_model_runtime("m", bad)
    from autorank.workload import Workload
    wl = Workload(dev, spec, DigitsData(input_size=16, batch_size=32))
    assert wl.device.runtime_mb == 300
