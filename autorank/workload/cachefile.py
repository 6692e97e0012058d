"""Cache files autorank writes for itself (the pretrained base model, the profile): written
atomically with their size and sha256 recorded, verified when read, and rebuilt when damaged.

A cache is ours: a truncated, overwritten or half-copied file is no fault of the user's. Readers
call `verify` (or catch `CacheDamaged` from their own parser) and, on damage, log one line
(`damaged_line`) and build the file again. Writing one on a full disk, a read-only mount or a
folder the user cannot write is one ConfigError line naming the folder and `paths.cache_dir`.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any, Callable

from autorank.errors import ConfigError
from autorank.io import atomic_write

__all__ = ["CacheDamaged", "bytes_record", "damaged_line", "unreadable", "verify", "write_cache"]

# errors that mean "this folder cannot take the file": no space, over a file-size or quota limit,
# a read-only mount, no permission
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class CacheDamaged(Exception):
    """A cache file is unreadable or does not match what was recorded when it was written."""


def bytes_record(data: bytes) -> dict[str, Any]:
    """What `verify` checks later: {"bytes": size, "sha256": hex digest}."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify(path: Path, record: Any) -> bytes:
    """The bytes of `path` when they match `record` (bytes_record); else CacheDamaged saying how
    they differ (a record of the wrong form is damage too)."""
    if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str)):
        raise CacheDamaged("its size and sha256 record is missing or malformed")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CacheDamaged(f"cannot be read: {e.strerror or e}") from e
    if len(data) != record["bytes"]:
        raise CacheDamaged(f"{len(data)} bytes, {record['bytes']} were written")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CacheDamaged("its sha256 differs from the one recorded when it was written")
    return data


def unreadable(e: BaseException) -> CacheDamaged:
    """CacheDamaged for what torch.load (or another reader) raised: its first sentence only (torch's
    own advice, such as loading with weights_only=False, is not for a file of ours)."""
    first = " ".join(str(e).split()).split(". ")[0][:100] or type(e).__name__
    return CacheDamaged(f"it cannot be read: {first}")


def damaged_line(what: str, path: Path, reason: Any, action: str) -> str:
    """'cached base model X is damaged (reason): pretraining it again' (one line)."""
    text = " ".join(str(reason).split()) or type(reason).__name__
    return f"cached {what} {path} is damaged ({text[:200]}): {action}"


def write_cache(path: Path, write_fn: Callable[[Path], Any], what: str) -> Path:
    """atomic_write(path, write_fn); a folder that cannot take the file (full disk, file-size
    limit, read-only, no permission) is one ConfigError line saying where and what to do."""
    try:
        return atomic_write(path, write_fn)
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        raise ConfigError(f"cannot write the cached {what} to {Path(path).parent} ({e.strerror or e}): free "
                          "space there or point paths.cache_dir=... at a writable folder with room") from e
