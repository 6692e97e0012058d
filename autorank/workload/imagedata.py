"""The base of the `data` options: a LightningDataModule holding images at their native size.

Every option gives two tasks with disjoint classes: `upstream` (pretraining the base model) and
`downstream` (fine-tuning with a plan, as the paper fine-tunes ImageNet models on other data).
Images are held at their native size (uint8 or float in [0, 1]); each batch is resized to
`input_size`, repeated to 3 channels and normalised when it is collated, so a 70,000-image set
costs its native bytes, not 3 x input_size**2 floats per image. The options: data.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from autorank.errors import ConfigError, ConfigFileNotFound

TASKS = ("upstream", "downstream")
PARTS = ("train", "val")


class DatasetMissing(ConfigFileNotFound):
    """A data set is not on disk and cannot be fetched here; the message says how to get it."""


class _ImageTensorDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class BatchTransform:
    """Collate: stack native-size images (N, C, h, w), scale to [0, 1], resize to input_size,
    repeat grayscale to 3 channels, normalise to mean 0.5 / std 0.5."""

    def __init__(self, input_size: int, channels: int = 3) -> None:
        self.input_size, self.channels = int(input_size), channels

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return ((x - 0.5) / 0.5).contiguous()  # (N, 3, S, S)

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*batch)
        return self.images(torch.stack(xs)), torch.stack(ys).long()


# A domain shift between the tasks (not only disjoint classes of the same images): fixed,
# exact transforms of the downstream images, so features learnt upstream fit less well and
# training deeper than the head pays. Names join with "+" ("invert+rot90"), applied left to right.
DOWNSTREAM_SHIFTS = ("invert", "hflip", "rot90", "rot180", "rot270")


def check_shift(shift: str | None) -> str | None:
    """The shift as given ('' and 'none' read as None); ConfigError for an unknown name."""
    if shift is None or str(shift).strip().lower() in ("", "none"):
        return None
    for name in str(shift).split("+"):
        if name not in DOWNSTREAM_SHIFTS:
            raise ConfigError(f"data.downstream_shift={shift!r}: unknown {name!r}; use one of "
                              f"{', '.join(DOWNSTREAM_SHIFTS)} or several joined by '+', or null")
    return str(shift)


def shift_images(images: torch.Tensor, shift: str | None) -> torch.Tensor:
    """(N, C, h, w) native images (uint8, or float in [0, 1]) with `shift` applied: invert is
    255 - x or 1 - x, hflip mirrors the width, rotK rotates by K degrees counter-clockwise."""
    shift = check_shift(shift)
    for name in shift.split("+") if shift else ():
        if name == "invert":
            images = 255 - images if images.dtype == torch.uint8 else 1.0 - images
        elif name == "hflip":
            images = images.flip(-1)
        else:
            images = torch.rot90(images, int(name[3:]) // 90, dims=(-2, -1))
    return images.contiguous()


class ImageData(L.LightningDataModule):
    """Base: subclasses implement `_load() -> (images, labels, val_mask or None, class_names)`.

    images: (N, C, h, w) uint8 or float in [0, 1]. val_mask marks an official test split (used
    as held-out validation); None means a deterministic stratified split with `val_fraction`.
    `upstream_classes` / `downstream_classes`: original label ids; labels of each task are
    remapped to 0..k-1 in the listed order. `max_per_class` caps the training images per class;
    `upstream_max_per_class` caps the upstream task's (pretraining) instead: "same" (the default)
    takes max_per_class, None keeps every upstream training image (a base model worth starting from
    while the downstream task stays small). `val_max_per_class` caps the validation images per
    class (None: all; a smoke run's shortcut, never a measurement's).
    `task` picks what train_dataloader / val_dataloader serve (Lightning's hooks).
    `downstream_shift`: None, or DOWNSTREAM_SHIFTS names joined by '+', applied to the downstream
    images only (train and val; shift_images).
    """

    default_upstream: Sequence[int] | None = None
    default_downstream: Sequence[int] | None = None
    loss = "class"  # what the workload trains with (autorank.cost.loss): classes on dim 1
    input_dtype = torch.float32

    def __init__(
        self,
        input_size: int = 32,
        batch_size: int = 64,
        upstream_classes: Sequence[int] | None = None,
        downstream_classes: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        max_per_class: int | None = None,
        upstream_max_per_class: int | None | str = "same",
        val_max_per_class: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        task: str = "downstream",
        downstream_shift: str | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.input_size, self.batch_size = int(input_size), int(batch_size)
        self.upstream_classes = list(upstream_classes) if upstream_classes is not None else None
        self.downstream_classes = list(downstream_classes) if downstream_classes is not None else None
        self.val_fraction, self.max_per_class = float(val_fraction), max_per_class
        if upstream_max_per_class == "same":
            upstream_max_per_class = max_per_class
        elif upstream_max_per_class is not None and (isinstance(upstream_max_per_class, (str, bool))
                                                     or int(upstream_max_per_class) < 1):
            raise ValueError(f"upstream_max_per_class must be a whole number >= 1, null (every image) or 'same' "
                             f"(max_per_class), got {upstream_max_per_class!r}")
        self.upstream_max_per_class = upstream_max_per_class
        self.val_max_per_class = val_max_per_class
        self.seed, self.num_workers, self.task = int(seed), int(num_workers), task
        self.downstream_shift = check_shift(downstream_shift)
        self.transform = BatchTransform(self.input_size)
        self._splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.class_names: list[str] = []

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(B, C, H, W): the batch the device trains with."""
        return (self.batch_size, 3, self.input_size, self.input_size)

    # --- what subclasses provide --------------------------------------------------------------
    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
        raise NotImplementedError

    def source_key(self) -> dict[str, Any]:
        """Where the images come from (for cache keys); subclasses with a folder add it."""
        return {}

    # --- splitting ----------------------------------------------------------------------------
    def key(self, task: str | None = None) -> dict[str, Any]:
        """Everything that determines the images and labels of a task (cache keys)."""
        key = {
            "data": type(self).__name__,
            **self.source_key(),
            "task": task or self.task,
            "classes": self.classes(task or self.task),
            "input_size": self.input_size,
            "val_fraction": self.val_fraction,
            "max_per_class": self.cap(task or self.task),
            "seed": self.seed,
        }
        if self.val_max_per_class is not None:  # keys without a validation cap unchanged
            key["val_max_per_class"] = self.val_max_per_class
        if (task or self.task) == "downstream" and self.downstream_shift:  # keys without a shift unchanged
            key["downstream_shift"] = self.downstream_shift
        return key

    def classes(self, task: str) -> list[int]:
        up, down = self.upstream_classes, self.downstream_classes
        if up is None:
            up = list(self.default_upstream) if self.default_upstream is not None else None
        if down is None:
            down = list(self.default_downstream) if self.default_downstream is not None else None
        if up is None or down is None:  # class count known only after loading (image folders)
            self.setup()
            n = len(self.class_names)
            up = up if up is not None else list(range(n // 2))
            down = down if down is not None else [c for c in range(n) if c not in up]
        if set(up) & set(down):
            raise ValueError(f"upstream and downstream classes overlap: {sorted(set(up) & set(down))}")
        return list(up) if task == "upstream" else list(down)

    def cap(self, task: str) -> int | None:
        """Training images per class of `task` (None: all)."""
        return self.upstream_max_per_class if task == "upstream" else self.max_per_class

    def num_classes(self, task: str | None = None) -> int:
        return len(self.classes(task or self.task))

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        images, labels, val_mask, self.class_names = self._load()
        labels = torch.as_tensor(labels).long()
        if val_mask is None:
            val_mask = _stratified_val_mask(labels, self.val_fraction, self.seed)
        self._splits = {}
        for task in TASKS:
            for part, mask in (("train", ~val_mask), ("val", val_mask)):
                idx = self._indices(labels, mask, task, cap=self.cap(task) if part == "train" else self.val_max_per_class)
                remap = {c: i for i, c in enumerate(self.classes(task))}
                y = torch.tensor([remap[int(v)] for v in labels[idx]], dtype=torch.long)
                x = shift_images(images[idx], self.downstream_shift) if task == "downstream" else images[idx]
                self._splits[(task, part)] = (x, y)

    def _indices(self, labels: torch.Tensor, mask: torch.Tensor, task: str, cap: int | None) -> torch.Tensor:
        keep = []
        for c in self.classes(task):
            idx = torch.nonzero(mask & (labels == c)).flatten()
            keep.append(idx[:cap] if cap is not None else idx)
        return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)

    # --- access --------------------------------------------------------------------------------
    def tensors(self, task: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(native-size images, remapped labels) of one task and part."""
        self.setup()
        assert self._splits is not None
        return self._splits[(task, part)]

    def dataset(self, task: str, part: str) -> Dataset:
        return _ImageTensorDataset(*self.tensors(task, part))

    def loader(self, task: str, part: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(task, part),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            collate_fn=self.transform,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.task, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.task, "val")


def _stratified_val_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Deterministic: the same labels and seed give the same held-out set."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[: int(round(len(idx) * fraction))]] = True
    return mask
