"""Writing files so that a reader never sees half of one (no imports of autorank: any layer may
use it, the torch-only core included)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write"]


def _new_temp(path: Path) -> Path:
    """An empty, new file beside `path`, named .<name>.<random>.tmp<suffix>, created with mode
    0o666 minus the umask, as open() creates files (tempfile.mkstemp would give 0o600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(path, write_fn: Callable[[Path], Any]) -> Path:
    """Write `path` atomically: `write_fn(tmp)` writes a temp file in the same folder (its name
    ends with path's suffix, so writers that pick a format by suffix - savefig - still work),
    which is flushed to disk and renamed over `path` with os.replace. A failure (an exception,
    Ctrl-C) leaves the old file as it was and removes the temp file. Creates the parent folder.
    The file gets ordinary permissions (0o666 minus the umask). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
