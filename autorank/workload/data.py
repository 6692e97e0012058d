"""LightningDataModules for the `data` config group: digits, Fashion-MNIST, CIFAR-10, image folders.

Each is an ImageData (autorank.workload.imagedata: tasks, splits, collate); the files are read by
scikit-learn (digits) and torchvision's own readers (the others), nothing downloaded at run time
unless asked for.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autorank.io import atomic_write

log = logging.getLogger(__name__)
from autorank.workload.imagedata import (
    DOWNSTREAM_SHIFTS,
    PARTS,
    TASKS,
    BatchTransform,
    DatasetMissing,
    ImageData,
    check_shift,
    shift_images,
)

__all__ = ["BatchTransform", "CIFAR10Data", "DOWNSTREAM_SHIFTS", "DatasetMissing", "DigitsData", "FashionMNISTData",
           "ImageData", "ImageFolderData", "PARTS", "TASKS", "check_shift", "shift_images"]


# --- the options ---------------------------------------------------------------------------------


class DigitsData(ImageData):
    """scikit-learn's bundled digits (1,797 8x8 images, no download): 0-4 upstream, 5-9 downstream."""

    default_upstream = (0, 1, 2, 3, 4)
    default_downstream = (5, 6, 7, 8, 9)

    def _load(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
        return images, torch.from_numpy(d.target), None, [str(i) for i in range(10)]


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class FashionMNISTData(ImageData):
    """Fashion-MNIST from the OS package `dataset-fashion-mnist` (gzipped IDX files in
    `source_dir`), unzipped into <root>/FashionMNIST/raw/ for torchvision's reader.
    Tops (0-4) upstream, shoes/bags and the rest (5-9) downstream; the official test set is val."""

    default_upstream = (0, 1, 2, 3, 4)
    default_downstream = (5, 6, 7, 8, 9)

    def __init__(self, root: str, source_dir: str = "/usr/share/datasets/fashion-mnist", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.source_dir = str(root), str(source_dir)

    def source_key(self) -> dict[str, Any]:
        return {"source_dir": self.source_dir}

    def prepare_data(self) -> None:
        raw = Path(self.root) / "FashionMNIST" / "raw"
        if all((raw / f).exists() for f in FASHION_MNIST_FILES):
            return
        src = Path(self.source_dir)
        missing = [f for f in FASHION_MNIST_FILES if not (src / f"{f}.gz").exists()]
        if missing:
            raise DatasetMissing(
                f"Fashion-MNIST not found: {src} lacks {', '.join(m + '.gz' for m in missing)}. "
                "Install the OS package with `make data-fashion-mnist` (apt-get install -y dataset-fashion-mnist) "
                "(or set data.source_dir to a folder holding the four gzipped IDX files)."
            )
        for f in FASHION_MNIST_FILES:
            atomic_write(raw / f, lambda tmp: _gunzip(src / f"{f}.gz", tmp))

    def _load(self):
        from torchvision.datasets import FashionMNIST

        self.prepare_data()
        parts = [FashionMNIST(self.root, train=t, download=False) for t in (True, False)]
        images = torch.cat([p.data for p in parts]).unsqueeze(1)  # (N, 1, 28, 28) uint8
        labels = torch.cat([p.targets for p in parts])
        val = torch.zeros(len(labels), dtype=torch.bool)
        val[len(parts[0].targets) :] = True
        return images, labels, val, list(FashionMNIST.classes)


def _gunzip(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


class CIFAR10Data(ImageData):
    """CIFAR-10 through torchvision's reader (the python version in <root>/cifar-10-batches-py:
    data_batch_1..5, test_batch, batches.meta, md5-checked). `download=True` fetches it where a
    network exists; offline, missing files are a one-line DatasetMissing. Classes 0-4 up, 5-9
    down; the official test batch is val."""

    default_upstream = (0, 1, 2, 3, 4)
    default_downstream = (5, 6, 7, 8, 9)

    def __init__(self, root: str, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.download = str(root), bool(download)

    @staticmethod
    def reader() -> type:
        """The torchvision dataset class that reads the files (a subclass may name another with
        the same layout)."""
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def source_key(self) -> dict[str, Any]:
        return {"root": self.root}

    def prepare_data(self) -> None:
        reader = self.reader()
        folder = Path(self.root) / reader.base_folder
        names = [n for n, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if not missing:
            return
        if self.download:
            try:
                reader(self.root, train=True, download=True)
                return
            except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), bad archive
                raise DatasetMissing(f"CIFAR-10 download failed ({e}); put the python batches in {folder}") from e
        raise DatasetMissing(
            f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}; expected data_batch_1..5, "
            "test_batch and batches.meta, the python version from https://www.cs.toronto.edu/~kriz/cifar.html); "
            "set data.download=true where a network exists, or data.root to the folder that holds cifar-10-batches-py"
        )

    def _load(self):
        self.prepare_data()
        reader = self.reader()
        try:
            parts = [reader(self.root, train=t, download=False) for t in (True, False)]
        except RuntimeError as e:  # torchvision: "not found or corrupted" (an md5 mismatch)
            raise DatasetMissing(f"CIFAR-10 in {Path(self.root) / reader.base_folder} is corrupted ({e}); "
                                 "fetch the python version again (data.download=true)") from e
        # torchvision holds (N, 32, 32, 3) views of the files' (N, 3, 32, 32) arrays: back to those
        images = torch.cat([torch.from_numpy(np.ascontiguousarray(p.data.transpose(0, 3, 1, 2))) for p in parts])
        labels = torch.tensor(parts[0].targets + parts[1].targets)
        val = torch.zeros(len(labels), dtype=torch.bool)
        val[len(parts[0].targets) :] = True
        return images, labels, val, list(parts[0].classes)


class ImageFolderData(ImageData):
    """Any folder of class subfolders (root/<class>/.../<image>), read by torchvision's
    ImageFolder (its image suffixes; empty class folders allowed). Classes are the sorted
    subfolder names; by default the first half is upstream and the rest downstream. Images are
    read once, converted to RGB and resized to `input_size` (uint8 in memory)."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = str(root)

    def source_key(self) -> dict[str, Any]:
        return {"root": str(Path(self.root).resolve())}

    def _load(self):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        root = Path(self.root)
        if not root.is_dir():
            raise DatasetMissing(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
        size = (self.input_size, self.input_size)
        resize = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                                     transforms.PILToTensor()])  # PIL's bilinear resize -> uint8 (3, S, S)
        try:
            folder = ImageFolder(str(root), transform=resize, allow_empty=True)
        except FileNotFoundError:  # no class folder at all
            folder = None
        classes = list(folder.classes) if folder is not None else []
        if len(classes) < 2:
            raise DatasetMissing(f"image folder {root} needs at least 2 class subfolders, found {classes}")
        if not folder.samples:
            raise DatasetMissing(f"no images ({', '.join(folder.extensions)}) under {root}")
        images, targets = decode_all(folder, root)
        return torch.stack(images), torch.tensor(targets), None, classes


def decode_all(folder: Any, root: Path) -> tuple[list[torch.Tensor], list[int]]:
    """Every image of a torchvision ImageFolder decoded, with its class. A file that cannot be
    decoded (random bytes, a truncated download, an image type PIL does not read) is skipped with
    one warning line naming the first few and the count: one broken file among thousands should
    not stop a run. When none decodes, a DatasetMissing saying so."""
    images, targets, bad = [], [], []
    for i, (path, target) in enumerate(folder.samples):
        try:
            images.append(folder[i][0])
        except Exception as e:  # noqa: BLE001 - PIL's errors for undecodable files vary (OSError, SyntaxError, ...)
            bad.append((path, e))
            continue
        targets.append(target)
    if bad:
        names = ", ".join(str(Path(p).relative_to(root)) for p, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
        if not images:
            raise DatasetMissing(f"image folder {root}: none of its {len(bad)} image files can be decoded ({names}; "
                                 f"e.g. {' '.join(str(bad[0][1]).split())[:120]}): put readable images there")
        log.warning("image folder %s: skipped %d of %d files that cannot be decoded as images (%s): remove or "
                    "replace them", root, len(bad), len(folder.samples), names)
    return images, targets
