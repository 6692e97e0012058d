"""The text `data` option: byte-level next-token windows from files on disk (nothing downloaded).

Two tasks, like the image options: `upstream` (pretraining the language model) and `downstream`
(fine-tuning it with a plan), each a list of glob patterns. A text's UTF-8 bytes are its tokens
(vocabulary 256, as `autorank.models.tiny_llama`), so no tokenizer is needed.

    files    every file the task's patterns match (`**` recursive), symlinks to the same file
             once, in sorted path order, read until `max_bytes` bytes (the last file cut)
    windows  the concatenated bytes cut into non-overlapping windows of seq_len + 1 tokens at a
             stride of seq_len: x = w[:-1], y = w[1:] (each window's last label is the next
             window's first input), a tail shorter than seq_len + 1 dropped
    split    by window: a seeded permutation, the first round(val_fraction * n) windows held out
             (at least one each way)

`{stdlib}` in a pattern is the running interpreter's standard-library folder
(sysconfig.get_paths()["stdlib"]): Python's own sources are on every machine that runs autorank.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from autorank.workload.imagedata import PARTS, TASKS, DatasetMissing

__all__ = ["TextData", "corpus_files", "read_corpus", "token_windows", "window_split"]

VOCAB_SIZE = 256  # byte-level


def expand_pattern(pattern: str) -> str:
    """`pattern` with `{stdlib}` and `~` expanded."""
    return os.path.expanduser(str(pattern).replace("{stdlib}", sysconfig.get_paths()["stdlib"]))


def corpus_files(patterns: Sequence[str]) -> list[str]:
    """The regular files the glob patterns match, sorted, each real file once (symlinks such as
    /usr/share/common-licenses/GPL -> GPL-3 would otherwise count a text twice)."""
    matches = sorted({f for p in patterns for f in glob.glob(expand_pattern(p), recursive=True)})
    seen, out = set(), []
    for f in matches:  # in sorted order: of a file and its links, the first path is kept
        real = os.path.realpath(f)
        if os.path.isfile(real) and real not in seen:
            seen.add(real)
            out.append(f)
    return out


def read_corpus(files: Sequence[str], max_bytes: int | None) -> bytes:
    """The files' bytes in the given order, concatenated, cut at max_bytes (None: all)."""
    parts, n = [], 0
    for f in files:
        if max_bytes is not None and n >= max_bytes:
            break
        with open(f, "rb") as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes - n)
        parts.append(data)
        n += len(data)
    return b"".join(parts)


def token_windows(data: bytes, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (n, seq_len) int64: window i covers bytes [i*seq_len, (i+1)*seq_len + 1),
    x its first seq_len bytes, y the same shifted by one (next-token labels)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    n = max(0, (len(tokens) - 1) // seq_len)
    w = tokens[: n * seq_len + 1].long()
    x = w[: n * seq_len].reshape(n, seq_len)
    y = w[1: n * seq_len + 1].reshape(n, seq_len)
    return x.contiguous(), y.contiguous()


def window_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), sorted: a seeded permutation's first round(val_fraction * n)
    held out, at least one window on each side when n >= 2."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * val_fraction))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    return perm[k:].sort().values, perm[:k].sort().values


class TextData(L.LightningDataModule):
    """Byte-level next-token windows of an upstream and a downstream corpus (module doc).

    The interface the workload reads of every data option: `loss` ("token": cross-entropy over
    the vocabulary at every position), `input_shape` (batch_size, seq_len), `input_dtype` (int64),
    `num_classes(task)` (the vocabulary: 256), `key(task)`, `loader(task, part)`, `batch_size`.
    """

    loss = "token"
    input_dtype = torch.long

    def __init__(self, upstream: Sequence[str], downstream: Sequence[str], seq_len: int = 128,
                 batch_size: int = 16, max_bytes: int | None = 1_000_000, val_fraction: float = 0.1,
                 seed: int = 0, num_workers: int = 0, task: str = "downstream") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if int(seq_len) < 1 or int(batch_size) < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        # one pattern may be given as a plain string (data.upstream=/texts/*.txt)
        self.patterns = {task: [str(p) for p in ([pats] if isinstance(pats, str) else pats)]
                         for task, pats in (("upstream", upstream), ("downstream", downstream))}
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.num_workers, self.task = int(num_workers), task
        self._corpus: dict[str, tuple[list[str], bytes]] = {}
        self._splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def input_shape(self) -> tuple[int, int]:
        """(B, L): the token batch the device trains with."""
        return (self.batch_size, self.seq_len)

    def num_classes(self, task: str | None = None) -> int:
        return VOCAB_SIZE

    def corpus(self, task: str) -> tuple[list[str], bytes]:
        """(files read, their bytes up to max_bytes); DatasetMissing when no file matches."""
        if task not in self._corpus:
            files = corpus_files(self.patterns[task])
            if not files:
                pats = ", ".join(expand_pattern(p) for p in self.patterns[task]) or "(none)"
                raise DatasetMissing(f"data.{task}: no file matches {pats}; point data.{task} at text files "
                                     f"(glob patterns, e.g. data.{task}='[/path/to/texts/**/*.txt]')")
            self._corpus[task] = (files, read_corpus(files, self.max_bytes))
        return self._corpus[task]

    def key(self, task: str | None = None) -> dict[str, Any]:
        """Everything that determines a task's windows (cache keys): the bytes' sha256 among them,
        so an edited or added file gives another key."""
        task = task or self.task
        files, data = self.corpus(task)
        return {"data": type(self).__name__, "task": task, "patterns": self.patterns[task],
                "n_files": len(files), "n_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "seq_len": self.seq_len, "max_bytes": self.max_bytes, "val_fraction": self.val_fraction,
                "seed": self.seed}

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        for task in TASKS:
            self.tensors(task, "train")

    def tensors(self, task: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) windows of one task and part, each (n, seq_len) int64."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if (task, part) not in self._splits:
            x, y = token_windows(self.corpus(task)[1], self.seq_len)
            if len(x) < 2:
                raise DatasetMissing(f"data.{task}: {len(self.corpus(task)[1])} bytes make {len(x)} windows of "
                                     f"{self.seq_len + 1} tokens; need at least 2 (more text or a smaller data.seq_len)")
            tr, va = window_split(len(x), self.val_fraction, self.seed)
            self._splits[(task, "train")] = (x[tr], y[tr])
            self._splits[(task, "val")] = (x[va], y[va])
        return self._splits[(task, part)]

    def loader(self, task: str, part: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(*self.tensors(task, part)), batch_size=batch_size or self.batch_size,
                          shuffle=shuffle, generator=g if shuffle else None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.task, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.task, "val")
