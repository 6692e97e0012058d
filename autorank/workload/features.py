"""FeatureCache: the frozen prefix's output, computed once per (checkpoint, cut, data, input size).

Without augmentation a frozen prefix computes the same features every epoch and every trial, so
a trial need only run (and pay for) the trained suffix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from autorank.workload.cachefile import CacheDamaged, damaged_line, unreadable, write_cache

log = logging.getLogger(__name__)


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(prefix: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix(x) for all batches, labels), prefix in eval mode (BN running statistics)."""
    prefix.eval()
    feats, labels = [], []
    for x, y in batches:
        feats.append(prefix(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """In memory always; on disk under `cache_dir` when one is given (torch.save, atomic)."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def path(self, key: dict[str, Any]) -> Path | None:
        return self.cache_dir / f"{key_hash(key)}.pt" if self.cache_dir else None

    def contains(self, key: dict[str, Any]) -> bool:
        h = key_hash(key)
        path = self.path(key)
        return h in self._memory or (path is not None and path.exists())

    def get(
        self,
        key: dict[str, Any],
        prefix: nn.Module,
        batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features for `key`, computing `prefix(x)` over `batches()` on a miss."""
        h = key_hash(key)
        if h in self._memory:
            self.hits += 1
            return self._memory[h]
        path = self.path(key)
        if path is not None and path.exists():
            cached = self._read(path, key)
            if cached is not None:
                self.hits += 1
                self._memory[h] = cached
                return cached
        self.misses += 1
        value = compute_features(prefix, batches())
        self._memory[h] = value
        if path is not None:
            entry = {"features": value[0], "labels": value[1], "key": json.dumps(key, sort_keys=True, default=str)}
            buf = io.BytesIO()
            torch.save(entry, buf)  # in memory: a full disk is then one line (write_cache)
            write_cache(path, lambda tmp: tmp.write_bytes(buf.getvalue()), "features")
        return value

    @staticmethod
    def _read(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (features, labels), or None after one warning line when the file is damaged
        (unreadable, not the entry written for `key`): the caller computes them again."""
        try:
            try:
                d = torch.load(path, weights_only=True)
            except Exception as e:  # noqa: BLE001 - whatever torch says of a damaged file
                raise unreadable(e) from e
            if not (isinstance(d, dict) and isinstance(d.get("features"), torch.Tensor)
                    and isinstance(d.get("labels"), torch.Tensor) and len(d["features"]) == len(d["labels"])):
                raise CacheDamaged("not the features and labels written there")
            if d.get("key") != json.dumps(key, sort_keys=True, default=str):
                raise CacheDamaged("written for another prefix or data")
        except CacheDamaged as e:
            log.warning(damaged_line("features", path, e, "computing them again"))
            return None
        return d["features"], d["labels"]

    def clear(self) -> None:
        self._memory.clear()
