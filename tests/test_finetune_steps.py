"""Workload.finetune(max_steps=..., eval_steps=...): a step count, not epochs, and the val accuracy
at several steps of one run, without changing the run."""

from __future__ import annotations

import pytest
import torch

from autorank.plan import Choice, Plan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workload(tmp_path_factory, small_workload):
    wl = small_workload(tmp_path_factory.mktemp("steps"), input_size=12, pretrain_epochs=1, max_epochs=1)
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
