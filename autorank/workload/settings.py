"""The workload's settings (conf/trainer, conf/paths) and what one fine-tuning run reports."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["FineTuneResult", "Paths", "TrainerConfig", "as_settings"]


@dataclass
class TrainerConfig:
    """conf/trainer: fine-tuning (per trial) and upstream pretraining settings."""

    max_epochs: int = 10
    steps: int | None = None  # SGD steps of a full-fidelity fine-tune (what the device runs); None: epochs
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    bn_eval: bool = True
    accelerator: str = "cpu"
    seed: int = 0
    feature_cache: str = "memory"  # memory | disk | off
    pretrain_epochs: int = 5  # at most, with pretrain_patience
    pretrain_patience: int | None = None  # stop once the upstream val accuracy has not risen for this many epochs
    pretrain_lr: float = 0.002
    pretrain_optimizer: str = "adam"  # from scratch, Adam converges in a few epochs where SGD does not
    pretrain_batch_size: int = 32  # smaller than the device batch: more steps for the same compute
    progress: bool = False  # Lightning bar per trial (pretraining always shows one)
    channels_last: str | bool = "auto"  # auto: channels-last layout on CPU (2-5x faster steps)
    resume_cache_mb: float = 256.0  # runs' end states kept in memory: a longer run of the same plan goes on from them


@dataclass
class Paths:
    """conf/paths: where outputs, caches (checkpoints, features) and data sets live."""

    root: str = "."
    output_dir: str = "outputs"
    cache_dir: str = ".cache/autorank"
    data_dir: str = "data"


@dataclass
class FineTuneResult:
    val_accuracy: float
    train_loss: float
    measured_activation_bytes: int
    train_wall_s: float
    epochs: int
    features_wall_s: float = 0.0  # prefix features (0 on a cache hit)
    cut: str = ""  # first block of the trained suffix
    # FLOPs of one real training step of the whole model at the device's batch shape (frozen
    # prefix forward + trained suffix forward and backward), counted by autorank.cost's corrected
    # FlopCounterMode on real tensors, in the default layout (the device runner's) whatever layout
    # training used: what train_step_flops(model, example_input, plan) predicts.
    measured_flops: int = 0
    # mean cross-entropy on the held-out data (per sample; per token for a language model,
    # whose perplexity is exp(val_loss))
    val_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


def as_settings(cls, value):
    """`value` as a `cls` dataclass: None gives the defaults, a mapping its known keys (Hydra's
    `_target_` and unknown keys left out)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(value).items() if k in names and not k.startswith("_")})
