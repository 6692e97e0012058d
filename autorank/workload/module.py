"""PlanModule: a LightningModule around any nn.Module (a plan applied or not)."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from autorank.cost.loss import check_loss, logits_of, training_loss
from autorank.plan import finetune_mode


class TrainingFailed(RuntimeError):
    """Fine-tuning diverged (NaN/inf loss) or could not run; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PlanModule(L.LightningModule):
    """Cross-entropy training of the parameters that require grad, with SGD (or Adam).

    bn_eval: BatchNorm layers stay in eval mode while training (running statistics frozen), as in
    the paper's fine-tuning setup; apply_plan decides whether their affine parameters train.
    channels_last: 4-D batches and the conv weights in channels-last layout (the same numbers
    and bytes; on CPU 2-5x faster steps for these nets: depthwise convolutions in the default
    layout run a slow path, docs/BENCHMARKS.md).
    loss: "class" (images: (B, C) logits, (B,) labels) or "token" (a language model's (B, L, V)
    logits against (B, L) next-token labels, mean over every position): autorank.cost.loss.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        bn_eval: bool = True,
        optimizer: str = "sgd",
        channels_last: bool = False,
        loss: str = "class",
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.loss = check_loss(loss)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.model = model
        self.lr, self.momentum, self.weight_decay, self.bn_eval = lr, momentum, weight_decay, bn_eval
        self.optimizer = optimizer
        self.optimizer_state = optimizer_state  # a run continued (autorank.workload.resume)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_losses: list[float] = []  # one mean per epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_layout(x, self.channels_last))

    def train(self, mode: bool = True) -> PlanModule:
        super().train(mode)
        if mode:
            finetune_mode(self.model, bn_eval=self.bn_eval)
        return self

    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum, self._epoch_n = 0.0, 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = training_loss(self(x), y, self.loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingFailed(f"loss is {value} at epoch {self.current_epoch}, batch {batch_idx}")
        self._epoch_loss_sum += value * len(y)
        self._epoch_n += len(y)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch_n:
            self.train_losses.append(self._epoch_loss_sum / self._epoch_n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingFailed("no parameter requires grad: nothing to train")
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer_state is not None:
            opt.load_state_dict(self.optimizer_state)
        return opt


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x in channels-last layout when asked and 4-D (N, C, H, W), else x."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def use_channels_last(setting: str | bool, accelerator: str) -> bool:
    """trainer.channels_last: true / false, or auto (on for CPU training, where it measured
    2-5x faster steps; GPUs keep the default layout)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"trainer.channels_last must be true, false or auto, got {setting!r}")
    return accelerator == "cpu"


@torch.no_grad()
def evaluate(model: nn.Module, batches, channels_last: bool = False, loss: str = "class") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over (x, y) batches, model in eval mode. loss "class": per
    sample (argmax over dim 1); "token": per label position (top-1 next-token accuracy, argmax
    over the vocabulary, the last dim), every position of every window weighing the same."""
    check_loss(loss)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches:
        logits = logits_of(model(to_layout(x, channels_last)))
        if loss == "token":  # (B, L, V) against (B, L): one prediction per position
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    return (correct / n if n else float("nan")), (loss_sum / n if n else float("nan"))


class EvalAtSteps(L.Callback):
    """Val accuracy after the listed optimizer steps of one fine-tuning run (accuracy at several
    fidelities from one run); `wall_s` is the time spent evaluating."""

    def __init__(self, steps: Iterable[int], val_batches: Iterable, offset: int = 0) -> None:
        self.steps, self.val_batches = {int(s) for s in steps}, val_batches
        self.offset = int(offset)  # steps run before this fit (a continued run)
        self.accuracy: dict[int, float] = {}
        self.wall_s = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = int(trainer.global_step) + self.offset
        if step in self.steps and step not in self.accuracy:
            t0 = time.perf_counter()
            d = pl_module.device  # mid-fit the model may be on an accelerator, the features are not
            self.accuracy[step], _ = evaluate(pl_module.model, ((x.to(d), y.to(d)) for x, y in self.val_batches),
                                              channels_last=pl_module.channels_last, loss=pl_module.loss)
            pl_module.train()  # evaluate restores plain train mode; the module's keeps BN in eval
            self.wall_s += time.perf_counter() - t0
