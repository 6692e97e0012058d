"""Ctrl-C that is never lost while the device runner trains.

Python raises KeyboardInterrupt wherever the SIGINT handler runs. When that is inside a weakref
callback or a `__del__` (torch frees storages through them, and the first step's saved-bytes
check uses weak references), Python prints "Exception ignored" and goes on: the interrupt is
swallowed and the training runs on. The latch remembers the signal, so the next `check()` (once
per training step) raises it again."""

from __future__ import annotations

import signal
import threading


class SigintLatch:
    """Within: SIGINT raises KeyboardInterrupt where it lands and sets `hit`; `check()` raises it
    again until the block is left. Outside the main thread (no signal handlers there) only
    `check()` is inert."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __enter__(self) -> "SigintLatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
