"""What one training step of a fine-tuned plan really costs, measured on real tensors: the bytes
the model saves for backward and the step's FLOPs, checked by the search against the cost
model's predictions (autorank.cost)."""

from __future__ import annotations

import torch
from torch import nn


def measure_suffix_step(suffix: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                        batch_size: int, loss: str = "class") -> tuple[int, int]:
    """(saved activation bytes, FLOPs) of one training step of the trained suffix on one batch of
    cached prefix features at the device's batch size.

    Saved bytes: what predict_saved_bytes predicts (the loss's own few bytes are in the peak's
    transient term). The frozen prefix records no graph, so the suffix on B cached features saves
    what the whole model would. FLOPs: the suffix's forward and backward, counted by autorank.cost's
    corrected FlopCounterMode; the loss is elementwise and counts 0, as output.sum() does in the
    prediction. Add prefix_forward_flops for the whole model's step as the device runs it (the
    device has no feature cache). The batch in the default layout, the device runner's (the
    caller puts the suffix's weights in it too). loss: "class" or "token" (autorank.cost.loss)."""
    from autorank.cost import flop_counter, measure_saved_bytes
    from autorank.cost.loss import training_loss

    idx = torch.arange(batch_size) % len(x_train)
    xb = x_train[idx].contiguous()  # fresh storage: a view would count all of x_train
    yb = y_train[idx]
    outs: list[torch.Tensor] = []
    with flop_counter() as counter:
        saved = measure_saved_bytes(lambda: outs.append(suffix(xb)) or outs[-1], suffix)
        training_loss(outs[0], yb, loss).backward()
    outs.clear()
    suffix.zero_grad(set_to_none=True)
    return int(saved.activation_bytes), int(counter.get_total_flops())


def prefix_forward_flops(prefix: nn.Module, batch: torch.Tensor, input_shape: tuple[int, ...]) -> int:
    """FLOPs of the frozen prefix's forward on one real batch, repeated to the device batch shape
    (frozen: the same FLOPs with or without grad)."""
    from autorank.cost import flop_counter

    if len(prefix) == 0:
        return 0
    x = batch[torch.arange(input_shape[0]) % len(batch)]
    if tuple(x.shape) != tuple(input_shape):
        raise RuntimeError(f"downstream batch {tuple(x.shape)} is not the device batch {tuple(input_shape)}")
    with torch.no_grad(), flop_counter() as counter:
        prefix(x)
    return int(counter.get_total_flops())
