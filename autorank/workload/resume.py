"""Exact continuation of a fine-tuning run: a refit at 100 steps goes on from the trial's 50.

A trial trains a plan `trial_steps` SGD steps; the refit of the same plan (same hparams, seed,
data) at the device's `steps` repeats those steps before its own. With constant-lr SGD, a seeded
data order that depends only on the step number, and the trained suffix, optimizer state and
torch RNG state kept at the trial's end, the refit continues from there and ends where a run from
step 0 would (tests/test_resume.py compares them). Our own code rather than Lightning's
checkpoints: Lightning resumes a fit mid-epoch only with stateful loaders and writes files;
this keeps the states in memory, bounded by trainer.resume_cache_mb, for the refits of one job.
Exact on the CPU; on a GPU as exact as two GPU runs of the same steps are (cuDNN may pick
nondeterministic kernels), the CUDA RNG restored too.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

__all__ = ["Snapshot", "SnapshotCache", "StepBatchSampler", "run_key"]


class StepBatchSampler(Sampler[list[int]]):
    """Batches of the global steps [start, stop) of one run over n samples: epoch e's order is
    randperm(n) from a generator seeded with (seed, e), so the batch of step s depends on s alone,
    and a run continued from step k sees exactly the batches a run from step 0 sees from k on.

    Each `iter()` yields the rest of the current epoch (Lightning calls it once per epoch);
    drop_last as torch's DataLoader: every batch full when n >= batch_size, else one batch of n."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, stop: int | None = None) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.per_epoch = self.n // self.batch_size if self.n >= self.batch_size else 1
        self.step, self.stop = int(start), stop

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.step, self.per_epoch)
        perm = self.order(epoch)
        for i in range(first, self.per_epoch):
            if self.stop is not None and self.step >= self.stop:
                return
            bs = min(self.batch_size, self.n)
            self.step += 1
            yield perm[i * bs:(i + 1) * bs].tolist()

    def __len__(self) -> int:
        return self.per_epoch - self.step % self.per_epoch


@dataclass
class Snapshot:
    """A run's state after `steps` optimizer steps: the trained suffix (ASI subspaces included),
    the optimizer's state_dict, torch's RNG state and the per-epoch train losses so far."""

    steps: int
    suffix: nn.Module
    optimizer_state: dict[str, Any]
    rng_state: torch.Tensor
    train_losses: list[float]
    cuda_rng_state: list[torch.Tensor] | None = None  # where CUDA was used (dropout on a GPU)

    @classmethod
    def take(cls, steps: int, suffix: nn.Module, optimizer: torch.optim.Optimizer,
             train_losses: list[float]) -> Snapshot:
        """Copies of the run's state now (after its last optimizer step)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(steps, copy.deepcopy(suffix), copy.deepcopy(optimizer.state_dict()),
                   torch.get_rng_state(), list(train_losses), cuda)

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng_state)
        if self.cuda_rng_state is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng_state)

    @property
    def nbytes(self) -> int:
        ts = [*self.suffix.parameters(), *self.suffix.buffers()]
        ts += [v for s in self.optimizer_state.get("state", {}).values() for v in s.values()
               if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts)


def run_key(plan: Any, hparams: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """What decides a run's steps: the plan's layers/bn/lean, its hparams and `context` (trainer
    settings, data, checkpoint). Two runs with the same key train the same steps."""
    d = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    what = {"layers": d.get("layers"), "bn": d.get("bn"), "lean": d.get("lean")}
    return json.dumps([what, dict(hparams), dict(context)], sort_keys=True, default=str)


class SnapshotCache:
    """Snapshots by run key, the latest per key, least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Snapshot] = OrderedDict()

    def put(self, key: str, snap: Snapshot) -> None:
        if self.max_bytes <= 0 or snap.nbytes > self.max_bytes:
            return
        self._items[key] = snap
        self._items.move_to_end(key)
        while sum(s.nbytes for s in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def get(self, key: str, before: int) -> Snapshot | None:
        """A copy of the snapshot of `key` taken before step `before` (None if there is none)."""
        snap = self._items.get(key)
        if snap is None or snap.steps >= before:
            return None
        self._items.move_to_end(key)
        return copy.deepcopy(snap)

    def __len__(self) -> int:
        return len(self._items)
