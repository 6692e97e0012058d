"""The base model: weights from `model.checkpoint`, or pretrained upstream once and cached.

The cache file name is a hash of everything that determines the weights (model factory and its
arguments, upstream data and input size, seed, epochs, optimiser settings), so a second run with
the same configuration loads the file instead of training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from torch import nn

from autorank import interrupt
from autorank.cost.loss import logits_of
from autorank.errors import ConfigError, ConfigFileNotFound
from autorank.workload.cachefile import (CacheDamaged, bytes_record, damaged_line, unreadable, verify,
                                        write_cache)
from autorank.workload.data import ImageData
from autorank.workload.textdata import TextData
from autorank.workload.features import key_hash
from autorank.models import ModelSpec
from autorank.workload.module import PlanModule, evaluate

log = logging.getLogger(__name__)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrain_key(spec: ModelSpec, data: ImageData | TextData, epochs: int, lr: float, momentum: float, seed: int,
                 batch_size: int, optimizer: str = "adam", patience: int | None = None) -> dict[str, Any]:
    stop = {} if patience is None else {"patience": patience}  # keys without early stopping unchanged
    return {
        **stop,
        "optimizer": optimizer,
        "model": spec.key(),
        "data": data.key("upstream"),
        "batch_size": batch_size,
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "seed": seed,
        "version": 3,  # 3: BatchNorm statistics recomputed after training (recompute_bn_stats)
    }


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (torch.load weights_only=True) into `model` with
    autorank.plan.load_base_weights (the one implementation, torch only); a classifier head of
    another size is skipped (the workload replaces the head for the downstream task anyway).
    A file that is no state dict or does not fit the model is a ConfigError naming the path."""
    from autorank.plan import load_base_weights

    try:
        load_base_weights(model, Path(path))
    except ValueError as e:  # names the path: unreadable (random bytes, truncated), or keys that do not fit
        raise ConfigError(str(e)) from e
    return model


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # BN kept in eval on purpose


def make_trainer(max_epochs: int | None, accelerator: str, output_dir: str | Path, progress: bool,
                 max_steps: int = -1, callbacks: Iterable[L.Callback] = ()) -> L.Trainer:
    """Lightning Trainer writing nothing into the cwd: no logger, no checkpoints, root under output_dir.
    max_steps > 0 (optimizer steps) stops training there; with max_epochs None it is the only limit."""
    _quiet_lightning()
    callbacks = [*callbacks, StopCheck()]
    if progress:
        try:
            from lightning.pytorch.callbacks import RichProgressBar

            callbacks.append(RichProgressBar())
        except ImportError:  # rich missing: Lightning's tqdm bar
            pass
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        num_sanity_val_steps=0,
    )


class StopCheck(L.Callback):
    """After every training step: a SIGINT/SIGTERM whose first raise was swallowed is raised
    again here (autorank.interrupt.check)."""

    def on_train_batch_end(self, *args: Any) -> None:
        interrupt.check()


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]]) -> int:
    """Replace every BatchNorm's running statistics with the cumulative average over `batches`
    (one pass, no grad; BN in train mode with momentum=None, every other module in eval mode).

    Why: a short Adam run leaves EMA statistics (momentum 0.1) that lag the weights; in eval mode
    they cost the base model up to 9 points upstream (docs/FIDELITY.md). PyTorch's cumulative
    average weights each batch equally, so the result is the mean of the per-batch means (the
    plain mean of the data when the batches are equal in size). The momenta and the model's
    train/eval modes are restored. Returns the number of batches seen (0: no BatchNorm, or no data).
    """
    bns = [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    n = 0
    try:
        for x, _ in batches:
            model(x)
            n += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return n


VAL_ACCURACY = "val_accuracy"


class PretrainModule(PlanModule):
    """PlanModule with a validation pass (pretraining only: a fine-tune has no validation loop)
    that logs the upstream accuracy as VAL_ACCURACY, which EarlyStopping watches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_accuracies: list[float] = []  # one per validation pass

    def on_validation_epoch_start(self) -> None:
        self._val_right, self._val_n = 0, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Counts right answers (classes, or next tokens); the epoch's accuracy is logged as
        VAL_ACCURACY (what pretraining's EarlyStopping watches)."""
        x, y = batch
        pred = logits_of(self(x)).argmax(-1)
        self._val_right += int((pred == y).sum())
        self._val_n += int(y.numel())

    def on_validation_epoch_end(self) -> None:
        acc = self._val_right / max(self._val_n, 1)
        self.val_accuracies.append(acc)
        self.log(VAL_ACCURACY, acc, prog_bar=True)


def pretrain(
    spec: ModelSpec,
    data: ImageData | TextData,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    seed: int,
    batch_size: int,
    accelerator: str,
    output_dir: str | Path,
    progress: bool = True,
    optimizer: str = "adam",
    channels_last: bool = False,
    patience: int | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train every layer (BN in train mode) on the upstream task, then recompute the BatchNorm
    statistics with one pass over the upstream training data (recompute_bn_stats); returns
    (model, stats), the accuracy measured in eval mode with the statistics that are saved.
    `patience`: stop before `epochs` once the upstream validation accuracy has not risen for that
    many epochs (Lightning's EarlyStopping; the weights are the last epoch's); None: every epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    torch.manual_seed(seed)
    model = spec(num_classes=data.num_classes("upstream"))
    cls = PlanModule if patience is None else PretrainModule  # no validation loop without a patience
    module = cls(model, lr=lr, momentum=momentum, bn_eval=False, optimizer=optimizer, channels_last=channels_last,
                 loss=data.loss)
    val = data.loader("upstream", "val")
    stop = [] if patience is None else [EarlyStopping(monitor=VAL_ACCURACY, mode="max", patience=patience)]
    trainer = make_trainer(epochs, accelerator, output_dir, progress, callbacks=stop)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=data.loader("upstream", "train", shuffle=True, batch_size=batch_size),
                val_dataloaders=val if stop else None)
    wall_s = time.perf_counter() - t0
    acc_ema, _ = evaluate(model, val, channels_last, loss=data.loss)
    t1 = time.perf_counter()
    n_bn_batches = recompute_bn_stats(model, data.loader("upstream", "train", batch_size=batch_size))
    bn_wall_s = time.perf_counter() - t1
    acc, loss = evaluate(model, val, channels_last, loss=data.loss)
    model.to(memory_format=torch.contiguous_format)  # the checkpoint in the default layout
    extra = {"upstream_val_perplexity": math.exp(loss)} if data.loss == "token" else {}
    return model, {"upstream_val_accuracy": acc, "upstream_val_loss": loss, "pretrain_wall_s": wall_s, **extra,
                   "upstream_val_accuracy_ema_bn": acc_ema, "bn_recompute_batches": n_bn_batches,
                   "bn_recompute_wall_s": bn_wall_s, "epochs_run": trainer.current_epoch,
                   "epoch_val_accuracy": list(getattr(module, "val_accuracies", [])),
                   "train_loss": module.train_losses[-1] if module.train_losses else float("nan")}


def base_checkpoint(
    spec: ModelSpec,
    data: ImageData | TextData,
    cache_dir: str | Path,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    seed: int,
    batch_size: int,
    accelerator: str = "cpu",
    output_dir: str | Path = ".",
    progress: bool = True,
    optimizer: str = "adam",
    channels_last: bool = False,
    patience: int | None = None,
) -> Path:
    """`spec.checkpoint` if set; else the cached upstream-pretrained checkpoint, trained on a miss
    and again when the cached one is damaged (check_cached: one warning line says so)."""
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        if not path.exists():
            raise ConfigFileNotFound(f"model.checkpoint={path} does not exist")
        return path
    key = pretrain_key(spec, data, epochs, lr, momentum, seed, batch_size, optimizer, patience)
    path = Path(cache_dir) / "checkpoints" / f"{spec.name}-{key_hash(key)}.pt"
    if path.exists():
        try:
            check_cached(path, key)
            log.info("base model: cached checkpoint %s", path)
            return path
        except CacheDamaged as e:
            log.warning(damaged_line("base model", path, e, "pretraining it again"))
    log.info("base model: pretraining %s on the upstream task for %s%d epochs (cached at %s)", spec.name,
             "" if patience is None else "at most ", epochs, path)
    model, stats = pretrain(spec, data, epochs=epochs, lr=lr, momentum=momentum, seed=seed, batch_size=batch_size,
                            optimizer=optimizer, channels_last=channels_last, patience=patience,
                            accelerator=accelerator, output_dir=output_dir, progress=progress)
    save_cached(path, model, key, stats)
    if stats["bn_recompute_batches"]:
        log.info("base model: upstream val accuracy %.3f after %.1f s (%.3f before the BatchNorm statistics were "
                 "recomputed)", stats["upstream_val_accuracy"], stats["pretrain_wall_s"],
                 stats["upstream_val_accuracy_ema_bn"])
    else:  # no BatchNorm (a transformer): nothing recomputed
        log.info("base model: upstream val accuracy %.3f, loss %.3f after %.1f s", stats["upstream_val_accuracy"],
                 stats["upstream_val_loss"], stats["pretrain_wall_s"])
    return path


def save_cached(path: Path, model: nn.Module, key: dict[str, Any], stats: dict[str, Any]) -> None:
    """The checkpoint and its .json beside it (the key, the pretraining stats and the checkpoint's
    size and sha256). The .json is written first: a .pt on disk always has its record."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # in memory: a full disk is then an OSError of ours
    data = buf.getvalue()
    text = json.dumps({"key": key, **stats, "checkpoint": bytes_record(data)}, indent=2, sort_keys=True,
                      default=str)
    write_cache(path.with_suffix(".json"), lambda tmp: tmp.write_text(text), "base model")
    write_cache(path, lambda tmp: tmp.write_bytes(data), "base model")


def check_cached(path: Path, key: dict[str, Any]) -> None:
    """CacheDamaged unless the cached checkpoint at `path` is whole: its .json beside it reads,
    was written for `key`, and records the checkpoint's size and sha256, which match. A .json from
    before these records were kept is accepted when the checkpoint loads as a state dict (the
    record is added)."""
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise CacheDamaged(f"{side.name} beside it is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheDamaged(f"{side.name} beside it is unreadable: {e}") from e
    if not isinstance(meta, dict) or json.loads(json.dumps(key, default=str)) != meta.get("key"):
        raise CacheDamaged(f"{side.name} beside it does not describe these pretraining settings")
    if "checkpoint" in meta:
        verify(path, meta["checkpoint"])
        return
    try:  # written before the records were kept
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says of a damaged file
        raise unreadable(e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CacheDamaged("not a state dict of tensors")
    meta["checkpoint"] = bytes_record(path.read_bytes())
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    write_cache(side, lambda tmp: tmp.write_text(text), "base model")
