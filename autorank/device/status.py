"""What the runner is doing, written where its supervisor (autorank.device.guard) can read it
after the kernel has killed the runner: a small JSON file named by $AUTORANK_DEVICE_STATUS.
Standard library only."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "AUTORANK_DEVICE_STATUS"


def report_phase(phase: str, **figures) -> None:
    """Record `phase` and its figures (merged with those recorded before); nothing without $ENV."""
    path = os.environ.get(ENV)
    if not path:
        return
    p = Path(path)
    try:
        state = json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        state = {}
    state.update({k: v for k, v in figures.items() if v is not None}, phase=phase)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, p)


def read_phase(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
