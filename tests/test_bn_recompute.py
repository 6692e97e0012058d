"""Base model BatchNorm statistics: recomputed after pretraining as the cumulative mean of one
no-grad pass, and the saved checkpoint scores in eval mode exactly what pretraining reported."""

from __future__ import annotations

import json

import torch
from torch import nn

from autorank.workload.base import base_checkpoint, load_weights, recompute_bn_stats
from autorank.workload.module import evaluate

torch.set_num_threads(1)


def _bn_inputs(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Forward pre-hooks recording every BatchNorm's input, per batch."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            seen[name] = []
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: seen[n].append(args[0].detach())))
    return seen, handles


def test_recompute_is_the_cumulative_mean_of_one_pass():
    torch.manual_seed(0)
    dropout = nn.Dropout(0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), dropout, nn.Conv2d(4, 5, 3),
                          nn.BatchNorm2d(5, momentum=0.3))
    model.train()
    batches = [(torch.randn(8, 3, 7, 7) * 3 + 1, None) for _ in range(3)]
    dropout_modes = []
    dropout.register_forward_hook(lambda mod, args, out: dropout_modes.append(mod.training))
    seen, handles = _bn_inputs(model)

    assert recompute_bn_stats(model, batches) == 3

    for h in handles:
        h.remove()
    assert dropout_modes == [False, False, False]  # everything but BN in eval during the pass
    assert model.training and dropout.training  # modes and momenta restored
    assert (model[1].momentum, model[5].momentum) == (0.1, 0.3)
    for name, xs in seen.items():
        bn = model.get_submodule(name)
        x = torch.cat(xs)  # equal batches: the cumulative mean is the plain mean of the data
        torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), rtol=0, atol=1e-5)
        batch_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in xs])
        torch.testing.assert_close(bn.running_var, batch_var.mean(0), rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == 3


def test_no_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 2))
    before = model[0].weight.clone()
    assert recompute_bn_stats(model, [(torch.randn(4, 3), None)]) == 0
    assert torch.equal(model[0].weight, before)


def test_saved_checkpoint_scores_the_reported_accuracy(tmp_path, small_workload):
    wl = small_workload(tmp_path, input_size=12)  # the tests' small model on 12 px digits (conftest)
    spec, data = wl.spec, wl.data
    path = base_checkpoint(spec, data, tmp_path / "cache", epochs=1, lr=0.01, momentum=0.9, seed=0,
                           batch_size=64, output_dir=tmp_path / "out", progress=False)
    stats = json.loads(path.with_suffix(".json").read_text())
    assert stats["key"]["version"] == 3
    n_train = len(data.tensors("upstream", "train")[1])
    assert stats["bn_recompute_batches"] == -(-n_train // 64)

    model = load_weights(spec(num_classes=5), path)  # fresh model, eval mode by evaluate
    acc, loss = evaluate(model, data.loader("upstream", "val"))
    assert acc == stats["upstream_val_accuracy"]
    assert abs(loss - stats["upstream_val_loss"]) < 1e-6

    # the saved statistics are the cumulative mean of one pass with batch 64: the mean of the
    # per-batch means of bn1's input (the conv before it is eval-mode and deterministic)
    model.eval()
    seen, _ = _bn_inputs(model)
    with torch.no_grad():
        for x, _ in data.loader("upstream", "train", batch_size=64):
            model(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen["bn1"]])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0), rtol=0, atol=1e-5)


def test_pretraining_stops_when_the_upstream_accuracy_stops_rising(tmp_path, small_workload):
    """pretrain_patience: Lightning's EarlyStopping on the upstream val accuracy. At a learning
    rate too small to change a weight only the BatchNorm statistics move the accuracy, so it stops
    rising within a few epochs: the run ends at the first epoch whose accuracy is not above the best
    before it (patience 1), well before the 6 allowed. The accuracies per epoch are kept in the
    checkpoint's stats; the cache key counts the patience (keys without one are unchanged)."""
    from autorank.workload.base import pretrain_key

    wl = small_workload(tmp_path, input_size=12)
    kw = dict(lr=1e-12, momentum=0.9, seed=0, batch_size=64, output_dir=tmp_path / "out", progress=False)
    path = base_checkpoint(wl.spec, wl.data, tmp_path / "cache", epochs=6, patience=1, **kw)
    stats = json.loads(path.with_suffix(".json").read_text())
    accs = stats["epoch_val_accuracy"]
    first_flat = next(e for e in range(1, len(accs)) if accs[e] <= max(accs[:e]))
    assert stats["epochs_run"] == len(accs) == first_flat + 1 < 6, accs
    assert stats["key"]["patience"] == 1
    model = load_weights(wl.spec(num_classes=5), path)
    # saved with the statistics recomputed, scored as the stats say
    assert evaluate(model, wl.data.loader("upstream", "val"))[0] == stats["upstream_val_accuracy"]
    full = base_checkpoint(wl.spec, wl.data, tmp_path / "cache", epochs=3, **kw)
    assert json.loads(full.with_suffix(".json").read_text())["epochs_run"] == 3
    assert "patience" not in pretrain_key(wl.spec, wl.data, 3, 0.01, 0.9, 0, 64)
