"""Training data for the device runner, read batch by batch: the data set's size does not add to
the process's memory (torch only; Pillow for an image folder).

Two sources:
- a tensor file (torch.save of {"x", "y"[, "x_val", "y_val"]} or (x, y)), memory-mapped
  (torch.load(mmap=True)): a batch is gathered from the mapping and the file's pages are handed
  back to the kernel after each batch (madvise), so resident memory stays at one batch. x is float
  images (used as they are), uint8 images (N, C, h, w) (scaled, resized to the plan's input and
  normalised as the search's data were: `normalise_images`) or integer tokens (N, L) with
  next-token labels y (N, L). Each float tensor is scanned once when the file is opened, a
  chunk at a time (its pages handed back), and NaN or inf refused, naming the tensor.
- an image folder: ROOT/<class>/<image> (classes: the sorted subfolder names), or ROOT/train/<class>
  and ROOT/val/<class> for a validation split; each batch's files are decoded, converted to RGB
  (or grayscale for a 1-channel model) and resized when the batch is built.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from autorank.device.checks import count_nonfinite, nonfinite_words, tensor_form
from autorank.plan import read_weights_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be read as given; the message names the file and the fix."""


def normalise_images(x: torch.Tensor, size: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """Images (N, C, h, w), uint8 in [0, 255] or float in [0, 1], to what the models were trained
    on: float, resized to `size` (bilinear), grayscale repeated to `channels`, mean 0.5 / std 0.5."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1 and channels != 1:
        x = x.expand(-1, channels, -1, -1)
    return ((x - 0.5) / 0.5).contiguous()


def _release(t: torch.Tensor) -> None:
    """Hand the file pages of a memory-mapped tensor back to the kernel (MADV_DONTNEED on its
    pages). They are clean pages of a private mapping: the next read maps them from the file
    again. A no-op where madvise is not available."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    storage = t.untyped_storage()
    page = mmap.PAGESIZE
    start = storage.data_ptr() // page * page
    end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _file_mapped(t: torch.Tensor) -> bool:
    """Whether `t`'s memory lies in a mapping of a file (/proc/self/maps): torch.load(mmap=True)
    worked. False where /proc cannot tell."""
    ptr = t.untyped_storage().data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= ptr < hi:
                    return len(fields) >= 6 and fields[4] != "0"  # an inode: a file
    except OSError:
        pass
    return False


@dataclass
class Split:
    """One split of the data: `labels` in memory (small), images or tokens read per batch."""

    labels: torch.Tensor
    kind: str  # "class" (images, cross-entropy) or "token" (next-token cross-entropy)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop whatever the last batch left resident (file pages); nothing by default."""


class TensorSplit(Split):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...] | None, mapped: bool) -> None:
        kind = "class" if (x.is_floating_point() or x.dtype == torch.uint8) else "token"
        super().__init__(y.long() if y.dtype != torch.int64 else y, kind)
        self.x, self.mapped = x, mapped
        self.size = tuple(int(v) for v in shape[2:]) if shape and len(shape) == 4 else None
        self.channels = int(shape[1]) if shape and len(shape) == 4 else 3

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.sort().values if self.mapped else idx  # read the file forwards
        x = self.x[idx]
        if self.kind == "token":
            x = x.long()
        elif x.dtype == torch.uint8:
            x = normalise_images(x, self.size, self.channels)
        else:
            x = x.float()
        return x, self.labels[idx]

    def release(self) -> None:
        if self.mapped:
            _release(self.x)


class FolderSplit(Split):
    def __init__(self, files: list[Path], labels: list[int], size: tuple[int, int], channels: int) -> None:
        super().__init__(torch.tensor(labels, dtype=torch.int64), "class")
        self.files, self.size, self.channels = files, size, channels

    def _read(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                c = 1 if self.channels == 1 else 3
                return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.size[0], self.size[1], c)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot decode image {path}: {e}; remove the file or convert it to PNG/JPEG") from e

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self._read(self.files[int(i)]) for i in idx]).permute(0, 3, 1, 2)
        return normalise_images(x, None, self.channels), self.labels[idx]


@dataclass
class DeviceData:
    train: Split
    val: Split | None
    source: str

    @property
    def kind(self) -> str:
        return self.train.kind


def _check_pair(path, nx: str, ny: str, a, b) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise DataError(f"data file {path}: {nx!r} and {ny!r} must be tensors")
    for name, t in ((nx, a), (ny, b)):
        why = tensor_form(f"data file {path}", name, t)
        if why:
            raise DataError(why)
    if a.is_complex() or a.dtype == torch.bool:
        raise DataError(f"data file {path}: {nx!r} is {a.dtype}: it must hold float or uint8 images "
                        "(N, C, H, W) or integer tokens (N, L)")
    if (a.is_floating_point() or a.dtype == torch.uint8) and b.dim() != 1:
        raise DataError(f"data file {path}: {ny!r} has shape {list(b.shape)}: class labels are one number "
                        f"per sample, shape (N,); save {ny}.reshape(-1) if it holds one label per sample")
    if len(a) != len(b) or len(a) == 0:
        raise DataError(f"data file {path}: {nx!r} has {len(a)} samples and {ny!r} {len(b)}: "
                        "they must be the same non-zero number")
    if b.is_floating_point() or b.is_complex():
        raise DataError(f"data file {path}: {ny!r} must hold integer class labels, got {b.dtype}")


def open_tensor_file(path: str | Path, shape=None) -> DeviceData:
    """The tensor file at `path`, memory-mapped (module doc); `shape` the plan's input shape."""
    try:
        d = read_weights_file(path, what="data file", how='torch.save({"x": x, "y": y}, path)', mmap=True)
    except ValueError as e:
        raise DataError(str(e)) from e
    if isinstance(d, (tuple, list)) and len(d) == 2:
        d = {"x": d[0], "y": d[1]}
    if not isinstance(d, dict):
        raise DataError(f"data file {path} holds a {type(d).__name__}: it must be a dict "
                        '{"x": ..., "y": ...} or a tuple (x, y)')
    if "x" not in d or "y" not in d:
        raise DataError(f"data file {path} holds a dict with keys {sorted(map(str, d))}: it needs "
                        '"x" (N, C, H, W) and "y" (N,) (and optionally "x_val" with "y_val")')
    xv, yv = d.get("x_val"), d.get("y_val")
    if (xv is None) != (yv is None):
        have, lack = ("x_val", "y_val") if yv is None else ("y_val", "x_val")
        raise DataError(f"data file {path} has {have!r} but no {lack!r}: give both for a validation "
                        "accuracy, or neither")
    pairs = [("x", "y", d["x"], d["y"])] + ([("x_val", "y_val", xv, yv)] if xv is not None else [])
    for nx, ny, a, b in pairs:
        _check_pair(path, nx, ny, a, b)
    x = d["x"]
    tokens = not (x.is_floating_point() or x.dtype == torch.uint8)
    if tokens and any(b.shape != a.shape for _, _, a, b in pairs):
        raise DataError(f"data file {path}: integer x is read as tokens (N, L), whose labels y are the next "
                        f"tokens, of x's shape; got x {list(x.shape)}, y {list(d['y'].shape)}")
    mapped = _file_mapped(x)
    for nx, _, a, _ in pairs:
        nan, inf = count_nonfinite(a, (lambda a=a: _release(a)) if mapped else None)
        if nan or inf:
            raise DataError(f"data file {path}'s {nx} holds {nonfinite_words(nan, inf)} values: training on "
                            "them gives a NaN loss; replace them (torch.nan_to_num) or drop those samples")
    train = TensorSplit(x, d["y"], shape, mapped)
    val = TensorSplit(xv, yv, shape, mapped) if xv is not None else None
    return DeviceData(train, val, f"{path} ({'memory-mapped' if mapped else 'read whole'})")


def _folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for i, c in enumerate(classes):
        found = sorted(f for f in (root / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [i] * len(found)
    return files, labels, classes


def open_image_folder(root: str | Path, shape) -> DeviceData:
    """ROOT/<class>/<image>, or ROOT/train/<class>/... with ROOT/val/<class>/... (module doc).
    `shape`: the plan's input shape (N, C, H, W): images are resized to (H, W)."""
    root = Path(root)
    if not shape or len(shape) != 4:
        raise DataError(f"image folder {root}: the plan records no image input shape (N, C, H, W) to "
                        "resize to; export the plan again or pass a tensor file")
    size, channels = (int(shape[2]), int(shape[3])), int(shape[1])
    split = (root / "train").is_dir() and (root / "val").is_dir()
    parts = {"train": root / "train", "val": root / "val"} if split else {"train": root}
    out, names = {}, None
    for part, folder in parts.items():
        files, labels, classes = _folder_files(folder)
        if len(classes) < 2:
            raise DataError(f"data folder {folder} needs at least 2 class subfolders (ROOT/<class>/<image>), "
                            f"found {classes}")
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        if names is not None and classes != names:
            raise DataError(f"image folder {root}: train/ has classes {names} but val/ has {classes}: "
                            "give both the same class subfolders")
        names = classes
        out[part] = FolderSplit(files, labels, size, channels)
    return DeviceData(out["train"], out.get("val"), f"{root} (image folder, {len(names)} classes, "
                      f"{len(out['train'])} training images, read batch by batch)")


def open_data(path: str | Path, shape=None) -> DeviceData:
    """A tensor file or an image folder (module doc)."""
    p = Path(path)
    if p.is_dir():
        return open_image_folder(p, shape)
    if not p.is_file():
        raise DataError(f"data {p} does not exist: pass a tensor file (torch.save) or an image folder "
                        "(ROOT/<class>/<image>)")
    return open_tensor_file(p, shape)
