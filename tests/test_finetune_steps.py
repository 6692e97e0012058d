"""Workload.finetune(max_steps=..., eval_steps=...): a step count, not epochs, and the val accuracy
at several steps of one run, without changing the run."""

from __future__ import annotations

import functools

import pytest
import torch

from autorank.plan import Choice, Plan
from autorank.workload.data import DigitsData
from autorank.workload.device import DeviceProfile
from autorank.models import ModelSpec, small_cnn
from autorank.workload.workload import Paths, TrainerConfig, Workload

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steps")
    spec = ModelSpec(functools.partial(small_cnn, width=8))
    data = DigitsData(input_size=12, batch_size=32)
    paths = Paths(root=str(tmp), output_dir=str(tmp / "out"), cache_dir=str(tmp / "cache"))
    trainer = TrainerConfig(pretrain_epochs=1, max_epochs=1, lr=0.05)
    wl = Workload(DeviceProfile("rpi4", 2048, 300, 400, 2.0), spec, data, trainer, paths)
    wl.prepare(progress=False)
    return wl


PLAN = Plan(layers={"conv3": Choice.full(), "fc": Choice.full()})


def test_max_steps_runs_that_many_steps_across_epochs(workload):
    steps_per_epoch = len(workload.data.tensors("downstream", "train")[1]) // 32  # drop_last
    n = steps_per_epoch + 3
    res = workload.finetune(PLAN, max_steps=n, eval_steps=(2, n, 10 * n))
    assert res.extra["steps"] == n and res.epochs == 2
    assert sorted(res.extra["val_accuracy_at_step"]) == [2, n]  # a step never reached is absent
    assert res.extra["val_accuracy_at_step"][n] == res.val_accuracy  # the last one is the result
    with pytest.raises(ValueError, match="max_steps"):
        workload.finetune(PLAN, max_steps=0)


def test_evaluating_at_steps_does_not_change_the_run(workload):
    a = workload.finetune(PLAN, max_steps=6, eval_steps=(1, 3, 5))
    b = workload.finetune(PLAN, max_steps=6)
    assert (a.val_accuracy, a.train_loss, a.extra["val_loss"]) == (b.val_accuracy, b.train_loss, b.extra["val_loss"])
    assert b.extra["val_accuracy_at_step"] == {}
    c = workload.finetune(PLAN, max_epochs=1)  # epochs as before
    assert c.epochs == 1 and c.extra["steps"] == len(workload.data.tensors("downstream", "train")[1]) // 32
