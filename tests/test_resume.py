"""A run continued from a shorter run of the same plan ends where a run from step 0 ends
(autorank.workload.resume): the refit of a trial's plan trains only the steps the trial did not."""

from __future__ import annotations

import functools

import pytest
import torch

from autorank.models import ModelSpec, mcunet_like
from autorank.plan import Choice, Plan
from autorank.workload.data import DigitsData
from autorank.workload.resume import SnapshotCache, StepBatchSampler
from autorank.workload.workload import Workload

torch.set_num_threads(1)


def make_workload(small_workload, tmp, resume_mb: float = 64.0) -> Workload:
    # mcunet_like: its classifier has dropout, so the continued run must restore torch's RNG too
    spec = ModelSpec(functools.partial(mcunet_like, width_mult=0.25))
    data = DigitsData(input_size=16, batch_size=32, upstream_classes=[0, 1, 2, 3, 4],
                      downstream_classes=[5, 6, 7, 8, 9], max_per_class=40)
    wl = small_workload(tmp, spec=spec, data=data, pretrain_epochs=1, resume_cache_mb=resume_mb)
    wl.prepare(progress=False)
    return wl


def plans(wl: Workload) -> list[Plan]:
    convs = [n for n, m in wl.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    head = {"classifier.1": Choice.full()}
    return [Plan(layers={convs[-1]: Choice.full(), **head}),
            Plan(layers={convs[-2]: Choice.asi([2, 4, 2, 2]), convs[-1]: Choice.full(), **head})]


@pytest.fixture(scope="module")
def workloads(tmp_path_factory, small_workload):
    tmp = tmp_path_factory.mktemp("resume")
    return make_workload(small_workload, tmp / "a"), make_workload(small_workload, tmp / "b", resume_mb=0)


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "asi"])
def test_continued_run_equals_a_run_from_step_zero(workloads, which):
    a, b = workloads
    plan = plans(a)[which]
    steps_per_epoch = len(a.data.tensors("downstream", "train")[1]) // 32
    short, full = steps_per_epoch + 2, 2 * steps_per_epoch + 3  # both stop mid-epoch
    first = a.finetune(plan, max_steps=short, lr=0.03)
    assert first.extra["continued_from"] == 0
    cont = a.finetune(plan, max_steps=full, lr=0.03, eval_steps=(short + 1, full))
    fresh = b.finetune(plan, max_steps=full, lr=0.03, eval_steps=(short + 1, full))
    assert cont.extra["continued_from"] == short and fresh.extra["continued_from"] == 0
    assert cont.extra["steps"] == fresh.extra["steps"] == full and cont.epochs == fresh.epochs == 3
    assert cont.val_accuracy == fresh.val_accuracy
    assert cont.extra["val_accuracy_at_step"] == fresh.extra["val_accuracy_at_step"]
    assert cont.val_loss == pytest.approx(fresh.val_loss, rel=1e-6, abs=1e-7)
    assert cont.train_loss == pytest.approx(fresh.train_loss, rel=1e-6, abs=1e-7)
    assert cont.measured_activation_bytes == fresh.measured_activation_bytes


def test_other_hparams_or_fewer_steps_start_from_zero(workloads):
    a, _ = workloads
    plan = plans(a)[0]
    a.finetune(plan, max_steps=4, lr=0.02)
    assert a.finetune(plan, max_steps=6, lr=0.01).extra["continued_from"] == 0  # other lr
    assert a.finetune(plan, max_steps=3, lr=0.02).extra["continued_from"] == 0  # fewer steps
    # the 3-step run replaced the 4-step state: the latest run of a key is what is kept
    assert a.finetune(plan, max_steps=5, lr=0.02).extra["continued_from"] == 3
    assert a.finetune(plan, max_epochs=1, lr=0.02).extra["continued_from"] == 0  # epochs: never


def drain(sampler: StepBatchSampler) -> list[list[int]]:
    """Every batch up to the sampler's stop, iter() once per epoch as Lightning calls it."""
    out: list[list[int]] = []
    while sampler.step < sampler.stop:
        assert len(sampler) == sampler.per_epoch - sampler.step % sampler.per_epoch
        out += list(sampler)
    return out


def test_sampler_order_depends_on_the_step_alone():
    whole = drain(StepBatchSampler(70, 16, seed=3, stop=11))
    rest = drain(StepBatchSampler(70, 16, seed=3, start=6, stop=11))
    assert rest == whole[6:] and len(whole) == 11
    assert len(list(StepBatchSampler(70, 16, seed=3, start=6))) == 2  # one iter(): the rest of epoch 1
    per_epoch = 70 // 16
    for e in range(2):  # each epoch: distinct indices, full batches (drop_last)
        idx = [i for b in whole[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert len(set(idx)) == len(idx) == per_epoch * 16
    small = drain(StepBatchSampler(5, 16, seed=0, stop=2))  # n < batch: one batch of n per epoch
    assert [sorted(b) for b in small] == [[0, 1, 2, 3, 4]] * 2 and small[0] != small[1]


def test_cache_keeps_the_latest_within_its_bytes():
    from autorank.workload.resume import Snapshot

    def snap(steps, n):
        return Snapshot(steps, torch.nn.Linear(n, 1, bias=False), {"state": {}}, torch.get_rng_state(), [])

    cache = SnapshotCache(max_bytes=4 * 250)
    cache.put("a", snap(5, 100))
    cache.put("b", snap(5, 100))
    assert len(cache) == 2 and cache.get("a", before=6).steps == 5
    assert cache.get("a", before=5) is None  # taken at 5: nothing to continue for a 5-step run
    cache.put("c", snap(5, 100))  # 1200 bytes > 1000: the least recently used ("b") goes
    assert cache.get("b", before=9) is None and cache.get("a", before=9) is not None
    SnapshotCache(0).put("x", snap(1, 1))  # off: keeps nothing, no error


def test_a_run_does_not_depend_on_the_feature_cache(tmp_path, small_workload):
    """Computing a cut's features iterates a DataLoader, which draws from torch's global RNG; the
    first run of a cut (cache cold) must train exactly like a later one (cache warm): the same
    dropout masks, so the same losses."""
    wl = make_workload(small_workload, tmp_path, resume_mb=0)
    plan = plans(wl)[1]
    cold = wl.finetune(plan, max_steps=5, lr=0.03)
    warm = wl.finetune(plan, max_steps=5, lr=0.03)
    assert cold.features_wall_s > 0
    assert warm.train_loss == cold.train_loss and warm.val_loss == cold.val_loss
