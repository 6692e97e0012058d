"""Workload: the base model, the device's batch and the fine-tuning of one plan.

    wl = Workload.from_config(cfg)            # or Workload(device, model, data, trainer, paths)
    wl.model                                  # pretrained upstream (cached), downstream head, no plan
    result = wl.finetune(plan)                # FineTuneResult

A trial deep-copies the base model, applies the plan, cuts the model before the first trained
block, trains only the suffix on cached prefix features and measures what one training step at
the device's batch shape saves for backward.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autorank.errors import ConfigError
from autorank.io import atomic_write
from autorank.plan import finetune_mode
from autorank.workload.base import base_checkpoint, file_sha256, load_weights, make_trainer
from autorank.workload.data import ImageData
from autorank.workload.textdata import TextData
from autorank.workload.device import DeviceProfile
from autorank.workload.features import FeatureCache
from autorank.workload.resume import Snapshot, SnapshotCache, StepBatchSampler, run_key
from autorank.models import ModelSpec, classifier_name, cut_name, replace_head, split_at_first_trained
from autorank.workload.stepcost import measure_suffix_step, prefix_forward_flops
from autorank.workload.module import EvalAtSteps, PlanModule, TrainingFailed, evaluate, use_channels_last
from autorank.workload.settings import FineTuneResult, Paths, TrainerConfig, as_settings

__all__ = ["FineTuneResult", "Paths", "TrainerConfig", "TrainingFailed", "Workload"]


class Workload:
    def __init__(
        self,
        device: DeviceProfile,
        model: ModelSpec,
        data: ImageData | TextData,
        trainer: TrainerConfig | Mapping[str, Any] | None = None,
        paths: Paths | Mapping[str, Any] | None = None,
    ) -> None:
        # the model's library (torchvision, numpy, Pillow) is part of the device's runtime
        if isinstance(device, DeviceProfile) and isinstance(model, ModelSpec):
            device = device.with_model_runtime(model.name, model.runtime_mb, model.runtime_source)
        self.device, self.spec, self.data = device, model, data
        self.trainer, self.paths = as_settings(TrainerConfig, trainer), as_settings(Paths, paths)
        cache = self.trainer.feature_cache
        if cache not in ("memory", "disk", "off"):
            raise ConfigError(f"trainer.feature_cache must be memory, disk or off, got {cache!r}")
        self.features = FeatureCache(Path(self.paths.cache_dir) / "features" if cache == "disk" else None)
        self.snapshots = SnapshotCache(int(self.trainer.resume_cache_mb * 2**20))
        self._model: nn.Module | None = None
        self._checkpoint: Path | None = None
        self._checkpoint_sha256 = ""

    @classmethod
    def from_config(cls, cfg: Any) -> Workload:
        """Build from a composed config with groups device, model, data, trainer, paths."""
        from hydra.utils import instantiate

        return cls(
            device=instantiate(cfg.device),
            model=instantiate(cfg.model),
            data=instantiate(cfg.data),
            trainer=instantiate(cfg.trainer),
            paths=instantiate(cfg.paths),
        )

    # --- the base model ------------------------------------------------------------------------
    def prepare(self, progress: bool = True) -> nn.Module:
        """Load or pretrain (once, cached) the base model and give it a fresh downstream head (a
        classifier; a language model keeps its output layer: the vocabulary is the same)."""
        if self._model is None:
            t = self.trainer
            model = self.spec(num_classes=self.data.num_classes("upstream"))
            self._check_vocabulary(model)  # before pretraining: a vocabulary too small fails there
            self._checkpoint = base_checkpoint(
                self.spec, self.data, self.paths.cache_dir, epochs=t.pretrain_epochs, lr=t.pretrain_lr,
                momentum=t.momentum, seed=t.seed, batch_size=t.pretrain_batch_size, accelerator=t.accelerator,
                optimizer=t.pretrain_optimizer, patience=t.pretrain_patience, channels_last=use_channels_last(t.channels_last, t.accelerator),
                output_dir=self.paths.output_dir, progress=progress,
            )
            load_weights(model, self._checkpoint)
            # Kept in its fine-tuning mode (train, BN in eval when trainer.bn_eval): the cost model
            # reads the modes, and a training step saves e.g. dropout masks that eval would not.
            if self.loss == "class":
                model = replace_head(model, self.num_classes, seed=t.seed)
            self._model = finetune_mode(model, t.bn_eval)
            self._checkpoint_sha256 = file_sha256(self._checkpoint)
        return self._model

    def _check_vocabulary(self, model: nn.Module) -> None:
        """A language model's output layer must cover the data's vocabulary (byte tokens: 256)."""
        if self.loss != "token":
            return
        out = model.get_submodule(classifier_name(model)).out_features
        if out != self.num_classes:
            raise ConfigError(f"the model predicts {out} tokens but the text data has a vocabulary of "
                              f"{self.num_classes} (bytes): set model.build.vocab_size={self.num_classes}")

    @property
    def model(self) -> nn.Module:
        return self.prepare()

    @property
    def checkpoint_path(self) -> Path:
        self.prepare()
        assert self._checkpoint is not None
        return self._checkpoint

    @property
    def checkpoint_sha256(self) -> str:
        self.prepare()
        return self._checkpoint_sha256

    @property
    def val_count(self) -> int | None:
        """Validation images of a classifier (what one point of its accuracy is worth); None for a
        language model, whose tokens are not independent answers."""
        return len(self.data.tensors("downstream", "val")[1]) if self.loss == "class" else None

    @property
    def num_classes(self) -> int:
        """Downstream classes; a language model's vocabulary."""
        return self.data.num_classes("downstream")

    @property
    def loss(self) -> str:
        """"class" (images) or "token" (next-token cross-entropy): autorank.cost.loss."""
        return self.data.loss

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The batch the device trains with: (B, C, H, W) images or (B, L) tokens."""
        return tuple(self.data.input_shape)

    def example_input(self) -> torch.Tensor:
        return torch.zeros(self.input_shape, dtype=self.data.input_dtype)

    def save_device_data(self, path: Path | str) -> Path:
        """The downstream task's training and validation data as the device runner reads them
        (autorank.device.data): images at their native size as uint8 (float images in [0, 1]
        rounded to 8 bits), resized and normalised per batch on the device; tokens as they are.
        Written atomically; a few MB where the float tensors at the input size were 100+ MB."""
        out = {}
        for part, (kx, ky) in (("train", ("x", "y")), ("val", ("x_val", "y_val"))):
            x, y = self.data.tensors("downstream", part)
            if x.is_floating_point():
                x = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
            out[kx], out[ky] = x.contiguous().clone(), y.long().clone()
        return atomic_write(path, lambda tmp: torch.save(out, tmp))

    def calibration_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n shuffled (seeded) downstream training batches at the device batch shape."""
        out = []
        for i, batch in enumerate(self.data.loader("downstream", "train", shuffle=True)):
            if i >= n:
                break
            out.append(batch)
        return out

    def finetune_settings(self, max_epochs: int | None = None, *, max_steps: int | None = None,
                          lr: float | None = None, momentum: float | None = None,
                          weight_decay: float | None = None):
        """How `finetune` trains a plan (autorank.plan.plan.FineTuneSettings), for the plan file:
        the model factory and kwargs (torch only), the device batch shape, lr, momentum, seed, and
        the length (max_steps, else trainer.steps, else epochs). lr, momentum, weight_decay:
        overrides of the trainer's (a trial's searched hparams)."""
        from autorank.plan.plan import FineTuneSettings

        k, t = self.spec.key(), self.trainer
        module, _, fn = k["factory"].rpartition(".")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        # the one place where the length is decided: a step count overrides epochs
        steps = max_steps if max_steps is not None else (t.steps if max_epochs is None else None)
        return FineTuneSettings(
            model_factory=f"{module}:{fn}",
            model_kwargs={**k["kwargs"], **({"num_classes": self.num_classes} if self.loss == "class" else {})},
            input_shape=self.input_shape, lr=float(t.lr if lr is None else lr),
            momentum=float(t.momentum if momentum is None else momentum), seed=int(t.seed),
            weight_decay=float(t.weight_decay if weight_decay is None else weight_decay),
            epochs=None if steps else int(max_epochs if max_epochs is not None else t.max_epochs),
            max_steps=int(steps) if steps else None)

    # --- one trial -----------------------------------------------------------------------------
    def _features(self, prefix: nn.Module, cut: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix features at `cut`. A cut not cached yet starts from the deepest cached cut before
        it (the prefix blocks are frozen, so block i's output is the same for every plan): a
        study whose trials cut at many places pays for each block once, not once per cut."""
        if self.trainer.feature_cache == "off":
            self.features.clear()
        blocks = list(prefix.children())
        n = len(blocks)

        def key(i: int) -> dict[str, Any]:
            return {"checkpoint_sha256": self.checkpoint_sha256, "head_seed": self.trainer.seed,
                    "cut_index": i, "data": self.data.key("downstream"), "part": part}

        start = max((i for i in range(n) if self.features.contains(key(i))), default=0)
        if start == 0:
            def batches():
                return self.data.loader("downstream", part)
        else:
            xs, ys = self.features.get(key(start), None, None)

            def batches():
                bs = self.data.batch_size
                return ((xs[j:j + bs], ys[j:j + bs]) for j in range(0, len(xs), bs))
        return self.features.get(key(n), nn.Sequential(*blocks[start:]), batches)

    def _resume_point(self, plan, hp, max_steps):
        """(run key, the latest Snapshot of the same run before max_steps or None); a run of
        epochs (max_steps None) is never continued."""
        if not max_steps:
            return "", None
        key = run_key(plan, hp, {"trainer": asdict(self.trainer), "data": self.data.key("downstream"),
                                 "checkpoint": self.checkpoint_sha256})
        return key, self.snapshots.get(key, before=max_steps)

    def _fit(self, suffix, x_train, y_train, val_loader, hp, snap, epochs, max_steps, eval_steps,
             progress, cl):
        """Train `suffix` on the features with Lightning from `snap` (or step 0): (module, trainer,
        EvalAtSteps, train wall seconds without the evaluations, batch sampler)."""
        t = self.trainer
        start = snap.steps if snap is not None else 0
        # Every step at the device's batch shape, the one the memory is predicted for (ASI's
        # warm-started subspaces are per shape: a short last batch would restart them).
        sampler = StepBatchSampler(len(x_train), self.data.batch_size, t.seed, start=start,
                                   stop=max_steps or None)
        # its own generator: each iter() of a loader draws a seed from torch's global RNG
        # otherwise, which a continued run would draw at a different step (dropout uses it)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_sampler=sampler,
                            generator=torch.Generator().manual_seed(t.seed))
        module = PlanModule(suffix, **hp, bn_eval=t.bn_eval, channels_last=cl, loss=self.loss,
                            optimizer_state=snap.optimizer_state if snap is not None else None)
        module.train_losses = list(snap.train_losses) if snap is not None else []
        at_steps = EvalAtSteps(eval_steps, val_loader, offset=start)
        trainer = make_trainer(None if max_steps else epochs, t.accelerator, self.paths.output_dir, progress,
                               max_steps=(max_steps - start) if max_steps else -1,
                               callbacks=[at_steps] if at_steps.steps else [])
        t1 = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - t1 - at_steps.wall_s
        return module, trainer, at_steps, wall, sampler

    def finetune(self, plan: Any, settings: Any = None, *, progress: bool | None = None,
                 eval_steps: Iterable[int] = (), **length_and_hparams: Any) -> FineTuneResult:
        """Fine-tune `plan` as `settings` say (autorank.plan.plan.FineTuneSettings, resolved by
        finetune_settings: exactly max_steps SGD steps when set, epochs otherwise; lr, momentum,
        weight_decay), the settings the plan file records. settings None: finetune_settings(
        **length_and_hparams) (max_epochs, max_steps, lr, momentum, weight_decay). eval_steps:
        optimizer steps after which the val accuracy is also measured, into
        extra["val_accuracy_at_step"] (their evaluation time is not in train_wall_s).
        extra["steps"]: the steps run."""
        from autorank.plan import apply_plan

        if settings is None:
            settings = self.finetune_settings(length_and_hparams.pop("max_epochs", None), **length_and_hparams)
        elif length_and_hparams:
            raise TypeError(f"finetune: pass either settings or {sorted(length_and_hparams)}, not both")
        base = self.prepare()
        max_steps = settings.max_steps
        epochs = int(settings.epochs or 0)
        progress = self.trainer.progress if progress is None else progress
        t = self.trainer
        torch.manual_seed(t.seed)
        model = apply_plan(copy.deepcopy(base), plan)
        prefix, suffix = split_at_first_trained(model, plan)
        cut = cut_name(model, plan)

        t0 = time.perf_counter()
        # computing a cut's features iterates DataLoaders, each drawing a seed from torch's global
        # RNG: forked, so a run trains (dropout) the same whether the cut's features were cached
        with torch.random.fork_rng(devices=[]):
            x_train, y_train = self._features(prefix, cut, "train")
            x_val, y_val = self._features(prefix, cut, "val")
        features_wall_s = time.perf_counter() - t0
        bs = self.data.batch_size

        if len(suffix) == 0:  # nothing trained: the "features" are the logits
            acc, val_loss = evaluate(nn.Identity(), [(x_val, y_val)], loss=self.loss)
            _, loss = evaluate(nn.Identity(), [(x_train, y_train)], loss=self.loss)
            return FineTuneResult(acc, loss, 0, 0.0, 0, features_wall_s, cut, val_loss=val_loss)

        hp = {"lr": settings.lr, "momentum": settings.momentum, "weight_decay": settings.weight_decay}
        key, snap = self._resume_point(plan, hp, max_steps)
        if snap is not None:  # the same run was trained fewer steps: go on from there (resume.py)
            suffix = snap.suffix
            snap.restore_rng()
        start = snap.steps if snap is not None else 0
        cl = use_channels_last(t.channels_last, t.accelerator)
        val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=bs)
        module, trainer, at_steps, train_wall_s, sampler = self._fit(
            suffix, x_train, y_train, val_loader, hp, snap, epochs, max_steps, eval_steps, progress, cl)
        steps = start + int(trainer.global_step)
        train_loss = module.train_losses[-1] if module.train_losses else float("nan")
        if max_steps:  # epochs begun, the last possibly partial
            epochs = -(-steps // sampler.per_epoch)
            # before evaluate and the measured step below, which would move ASI's subspaces on
            self.snapshots.put(key, Snapshot.take(steps, suffix, trainer.optimizers[0], module.train_losses))

        acc, val_loss = evaluate(suffix, val_loader, channels_last=cl, loss=self.loss)

        # The step as the device runs it, measured on real tensors (the search compares it with
        # the prediction): the suffix's step on cached features + the frozen prefix's forward, in
        # the device runner's default layout (ASI projects its modes in memory order, so the
        # compression's FLOPs differ in channels-last: 1.6% of a deep step's).
        module.train()
        if cl:
            suffix.to(memory_format=torch.contiguous_format)
        saved_bytes, suffix_flops = measure_suffix_step(suffix, x_train, y_train, bs, loss=self.loss)
        batch, _ = next(iter(self.data.loader("downstream", "train")))
        prefix_flops = prefix_forward_flops(prefix, batch, self.input_shape)
        return FineTuneResult(
            val_accuracy=acc, train_loss=train_loss, measured_activation_bytes=saved_bytes,
            train_wall_s=train_wall_s, epochs=epochs, features_wall_s=features_wall_s, cut=cut,
            measured_flops=prefix_flops + suffix_flops, val_loss=val_loss,
            extra={"val_loss": val_loss, "measured_prefix_flops": prefix_flops, "steps": steps,
                   "continued_from": start,
                   "val_accuracy_at_step": at_steps.accuracy},
        )
