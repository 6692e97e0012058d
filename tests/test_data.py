"""The `data` options: splits, and each reader on small data the tests make on disk (nothing here
can be downloaded): Fashion-MNIST's gzipped IDX files, CIFAR-10's pickled batches, image folders."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from autorank.workload.data import CIFAR10Data, DatasetMissing, DigitsData, FashionMNISTData, ImageFolderData


def test_digits_split_is_deterministic_and_disjoint():
    a, b = DigitsData(input_size=12, batch_size=16), DigitsData(input_size=12, batch_size=16)
    up_x, up_y = a.tensors("upstream", "train")
    down_x, down_y = a.tensors("downstream", "train")
    val_x, _ = a.tensors("downstream", "val")
    assert len(up_x) + len(a.tensors("upstream", "val")[0]) + len(down_x) + len(val_x) == 1797
    assert torch.equal(val_x, b.tensors("downstream", "val")[0])
    assert sorted(up_y.unique().tolist()) == sorted(down_y.unique().tolist()) == [0, 1, 2, 3, 4]
    assert abs(len(val_x) / (len(val_x) + len(down_x)) - 0.2) < 0.01
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (16, 3, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale repeated


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0800 + {1: 1, 3: 3}[array.ndim]  # unsigned byte, ndim
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_package_files(tmp_path):
    src = tmp_path / "pkg"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = FashionMNISTData(root=str(tmp_path / "data"), source_dir=str(src), input_size=20, batch_size=8)
    x, y = data.tensors("downstream", "train")
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8
    assert len(data.tensors("downstream", "val")[1]) == 10  # the t10k images of classes 5-9
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    xb, _ = next(iter(data.val_dataloader()))
    assert xb.shape == (8, 3, 20, 20)


def test_fashion_mnist_missing_says_apt_get(tmp_path):
    data = FashionMNISTData(root=str(tmp_path / "data"), source_dir=str(tmp_path / "none"))
    with pytest.raises(DatasetMissing, match=r"apt-get install -y dataset-fashion-mnist"):
        data.setup()


class MadeCIFAR10Data(CIFAR10Data):
    """CIFAR10Data reading batches this test makes: torchvision's own CIFAR10 reader with the
    files' md5 sums left out (test-made batches cannot match them), the way torchvision's
    CIFAR100 subclass redefines the same lists. The real data keeps the md5 check."""

    @staticmethod
    def reader():
        from torchvision.datasets import CIFAR10

        class Unchecked(CIFAR10):
            train_list = [[name, None] for name, _ in CIFAR10.train_list]
            test_list = [[name, None] for name, _ in CIFAR10.test_list]
            meta = {**CIFAR10.meta, "md5": None}

        return Unchecked


def write_cifar10(root, per_batch=6, n_test=10):
    """CIFAR-10's python layout (pickled dicts, data (n, 3072) uint8 in CHW order), tiny; label
    of the i-th training image: i % 10. Returns the first training batch's data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    first = None
    for b in range(5):
        d = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
             "labels": [(b * per_batch + i) % 10 for i in range(per_batch)]}
        first = d["data"] if first is None else first
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(d, f)
    d = {"data": rng.integers(0, 255, (n_test, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n_test)]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(d, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return first


def test_cifar10_from_batches(tmp_path):
    first = write_cifar10(tmp_path)
    data = MadeCIFAR10Data(root=str(tmp_path), input_size=16, batch_size=4)
    x, y = data.tensors("upstream", "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8  # 30 images, classes 0-4
    assert torch.equal(x[0], torch.from_numpy(first[0].reshape(3, 32, 32)))  # image 0 (class 0), CHW
    assert len(data.tensors("downstream", "val")[1]) == 5  # the test batch's classes 5-9
    assert data.class_names[5] == "dog"
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_cifar10_md5_is_checked_on_real_layout(tmp_path):
    write_cifar10(tmp_path)  # every file there, none with CIFAR-10's md5
    with pytest.raises(DatasetMissing, match="corrupted"):
        CIFAR10Data(root=str(tmp_path)).setup()


def test_cifar10_missing_names_folder(tmp_path):
    with pytest.raises(DatasetMissing, match=str(tmp_path / "cifar-10-batches-py")):
        CIFAR10Data(root=str(tmp_path)).setup()
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetMissing, match="missing data_batch_3;") as e:
        MadeCIFAR10Data(root=str(tmp_path)).setup()
    assert "\n" not in str(e.value)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = ImageFolderData(root=str(tmp_path), input_size=8, batch_size=4, val_fraction=0.2)
    assert data.classes("upstream") == [0, 1] and data.classes("downstream") == [2, 3]
    assert data.class_names == ["ant", "bee", "cat", "dog"]
    x, y = data.tensors("downstream", "train")
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.uint8 and sorted(y.tolist()) == [0] * 4 + [1] * 4
    # each image: RGB, resized with PIL's bilinear filter, channels first
    expected = {c: [torch.from_numpy(np.array(Image.open(tmp_path / c / f"{i}.png").convert("RGB")
                                                .resize((8, 8), Image.BILINEAR))).permute(2, 0, 1)
                    for i in range(5)] for c in ("cat", "dog")}
    assert all(any(torch.equal(a, e) for e in expected[("cat", "dog")[int(label)]]) for a, label in zip(x, y))
    with pytest.raises(DatasetMissing, match="does not exist"):
        ImageFolderData(root=str(tmp_path / "nope")).setup()
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DatasetMissing, match="at least 2 class subfolders"):
        ImageFolderData(root=str(tmp_path / "one")).setup()
    (tmp_path / "one" / "other").mkdir()
    with pytest.raises(DatasetMissing, match="no images"):
        ImageFolderData(root=str(tmp_path / "one")).setup()


def test_upstream_and_validation_caps(tmp_path):
    """upstream_max_per_class caps the pretraining images apart from the downstream task's
    max_per_class ("same": the same cap, None: every image); val_max_per_class caps validation.
    Each changes its task's cache key only, so existing base models and features stay valid."""
    kw = dict(input_size=12, batch_size=16, max_per_class=10)
    same, every = DigitsData(**kw), DigitsData(**kw, upstream_max_per_class=None)
    two, val3 = DigitsData(**kw, upstream_max_per_class=2), DigitsData(**kw, val_max_per_class=3)
    n_up = len(DigitsData(input_size=12).tensors("upstream", "train")[1])  # every upstream training image
    assert len(same.tensors("upstream", "train")[1]) == 5 * 10
    assert len(every.tensors("upstream", "train")[1]) == n_up > 5 * 10
    assert torch.bincount(two.tensors("upstream", "train")[1]).tolist() == [2] * 5
    for d in (every, two):
        assert len(d.tensors("downstream", "train")[1]) == 5 * 10  # downstream keeps max_per_class
        assert d.key("downstream") == same.key("downstream") and d.key("upstream") != same.key("upstream")
    assert torch.bincount(val3.tensors("downstream", "val")[1]).tolist() == [3] * 5
    assert torch.bincount(val3.tensors("upstream", "val")[1]).tolist() == [3] * 5
    assert len(same.tensors("downstream", "val")[1]) > 15 and "val_max_per_class" not in same.key()
    assert val3.key() != same.key()
    for bad in (0, "all", True):
        with pytest.raises(ValueError, match="upstream_max_per_class"):
            DigitsData(**kw, upstream_max_per_class=bad)
