"""The text data option (autorank.workload.textdata): files, byte windows, next-token labels and
the split, exact on corpora the tests write; and the token objective (accuracy and loss per
position) against a hand computation."""

from __future__ import annotations

import math
import os
import sysconfig

import pytest
import torch
from torch import nn

from autorank.errors import ConfigError
from autorank.workload.module import PlanModule, evaluate
from autorank.workload.textdata import (DatasetMissing, TextData, corpus_files, expand_pattern, read_corpus,
                                        token_windows, window_split)


def write(tmp_path, files: dict[str, bytes]):
    for name, data in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_windows_and_labels_exact():
    x, y = token_windows(b"abcdefghij", 3)  # 10 bytes: (10 - 1) // 3 = 3 windows, the last byte only a label
    assert x.dtype == y.dtype == torch.int64
    assert [bytes(r.tolist()) for r in x] == [b"abc", b"def", b"ghi"]
    assert [bytes(r.tolist()) for r in y] == [b"bcd", b"efg", b"hij"]
    x, y = token_windows("é€".encode(), 2)  # UTF-8 bytes are the tokens: c3 a9 e2 82 ac
    assert x.tolist() == [[0xC3, 0xA9], [0xE2, 0x82]] and y.tolist() == [[0xA9, 0xE2], [0x82, 0xAC]]
    assert token_windows(b"abc", 3)[0].shape == (0, 3)  # 3 bytes: no window of 4


def test_files_sorted_symlinks_once_recursive_and_max_bytes(tmp_path):
    write(tmp_path, {"b.txt": b"BBBB", "a.txt": b"AAAA", "sub/c.txt": b"CCCC", "skip.bin": b"x"})
    os.symlink(tmp_path / "a.txt", tmp_path / "z_link.txt")
    files = corpus_files([str(tmp_path / "*.txt"), str(tmp_path / "**" / "*.txt")])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.txt", "b.txt", "sub/c.txt"]
    assert read_corpus(files, None) == b"AAAABBBBCCCC"
    assert read_corpus(files, 6) == b"AAAABB"  # the second file cut, the third not read
    assert expand_pattern("{stdlib}/os.py") == os.path.join(sysconfig.get_paths()["stdlib"], "os.py")


def test_split_by_window_is_disjoint_seeded_and_complete(tmp_path):
    text = bytes(range(32, 127)) * 4  # 380 bytes
    write(tmp_path, {"up.txt": text, "down.txt": text[::-1]})
    d = TextData(upstream=[str(tmp_path / "up.txt")], downstream=[str(tmp_path / "down.txt")], seq_len=7,
                 batch_size=4, val_fraction=0.25, seed=3, max_bytes=None)
    x_all, y_all = token_windows(text[::-1], 7)
    n = (len(text) - 1) // 7
    assert len(x_all) == n == 54
    (xt, yt), (xv, yv) = d.tensors("downstream", "train"), d.tensors("downstream", "val")
    assert len(xv) == round(0.25 * n) == 14 and len(xt) == n - 14
    tr, va = window_split(n, 0.25, 3)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and sorted(tr.tolist() + va.tolist()) == list(range(n))
    assert torch.equal(xt, x_all[tr]) and torch.equal(yv, y_all[va])
    assert torch.equal(window_split(n, 0.25, 3)[1], va) and not torch.equal(window_split(n, 0.25, 4)[1], va)
    assert d.input_shape == (4, 7) and d.num_classes() == 256 and d.loss == "token"
    xb, yb = next(iter(d.loader("downstream", "train")))
    assert xb.shape == (4, 7) and torch.equal(xb[:, 1:], yb[:, :-1])  # labels are the inputs shifted by one


def test_key_follows_the_bytes(tmp_path):
    write(tmp_path, {"up.txt": b"x" * 100, "down.txt": b"y" * 100})
    kw = dict(upstream=[str(tmp_path / "up.txt")], downstream=[str(tmp_path / "down.txt")], seq_len=4)
    k1 = TextData(**kw).key("upstream")
    assert k1["n_bytes"] == 100 and k1["n_files"] == 1
    assert TextData(**kw).key("upstream") == k1
    (tmp_path / "up.txt").write_bytes(b"x" * 99 + b"z")
    assert TextData(**kw).key("upstream")["sha256"] != k1["sha256"]
    assert TextData(**kw).key("downstream") != TextData(**kw).key("upstream")
    one = TextData(upstream=str(tmp_path / "up.txt"), downstream=str(tmp_path / "down.txt"), seq_len=4)
    assert one.patterns["upstream"] == [str(tmp_path / "up.txt")]  # a plain string is one pattern


def test_missing_corpus_is_one_line_config_error(tmp_path):
    d = TextData(upstream=[str(tmp_path / "none" / "*.py")], downstream=[str(tmp_path / "*.txt")], seq_len=4)
    with pytest.raises(DatasetMissing) as e:
        d.tensors("upstream", "train")
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert str(tmp_path / "none" / "*.py") in str(e.value) and "data.upstream" in str(e.value)
    write(tmp_path, {"short.txt": b"abcdef"})  # one window of 5: no val window
    with pytest.raises(DatasetMissing, match="data.seq_len"):
        d.tensors("downstream", "val")


class FixedLogits(nn.Module):
    """Returns the given (B, L, V) logits whatever the tokens, as a Hugging Face output would."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return type("Out", (), {"logits": self.logits[: len(x)]})()


def test_token_accuracy_and_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[0.0, 0.0, 3.0], [1.0, 1.0, 0.0]]])  # (B=2, L=2, V=3)
    y = torch.tensor([[0, 2], [2, 1]])
    model = FixedLogits(logits)
    acc, loss = evaluate(model, [(torch.zeros(2, 2, dtype=torch.long), y)], loss="token")
    # argmax per position: 0, 1, 2, 0 (ties to the first): right at (0,0) and (1,0) -> 2 of 4
    assert acc == 0.5

    def nll(row, k):
        return math.log(sum(math.exp(v) for v in row)) - row[k]

    by_hand = (nll([2, 0, 0], 0) + nll([0, 1, 0], 2) + nll([0, 0, 3], 2) + nll([1, 1, 0], 1)) / 4
    assert loss == pytest.approx(by_hand, abs=1e-6)
    # two batches of one window each: every position weighs the same, as in one batch
    acc2, loss2 = evaluate(model, [(torch.zeros(1, 2, dtype=torch.long), y[:1]),
                                   (torch.zeros(1, 2, dtype=torch.long), y[1:])], loss="token")
    assert acc2 == 0.5  # first batch: logits[:1] for both (FixedLogits ignores x): 1 right + 1 right
    module = PlanModule(model, loss="token")
    module.on_train_epoch_start()
    step = module.training_step((torch.zeros(2, 2, dtype=torch.long), y), 0)
    assert float(step) == pytest.approx(by_hand, abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        PlanModule(model, loss="tokens")
