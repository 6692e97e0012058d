"""Ctrl-C and SIGTERM as one exception the search can clean up after (no imports of autorank).

Python turns SIGINT into KeyboardInterrupt, and Lightning's Trainer.fit turns that into
`sys.exit(1)` (and SIGTERM into its SIGTERMException, a SystemExit) deep inside a trial: Optuna
then never closes the trial and the process exits 1 without a word. Inside `stop_on_signals()`
both signals raise `Interrupted` instead, a BaseException that Lightning re-raises untouched (it
keeps any SIGTERM handler that was there before it) and that no `except Exception` swallows; the
study marks the trial FAIL and queues it again, the tracker ends its runs, and the app prints one
line and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell does.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. `trial`: the study's trial number it stopped, when one ran."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.trial: int | None = None
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        """The one line the app prints."""
        where = f" during trial {self.trial}" if self.trial is not None else ""
        return f"autorank: {self.signal_name} received: interrupted{where}; run the same command to continue"


_raised: list[int] = []  # signals raised inside the current stop_on_signals() block
_reraised: list[int] = []  # ... and raised again by check()


def _raise(signum: int, frame: FrameType | None) -> None:
    # A second signal while the first is being handled (the study closing its trial) is ignored:
    # the clean-up takes a second or two, and a second Ctrl-C must not leave a trial RUNNING.
    # A flag, not SIG_IGN: Lightning's teardown puts back the handler it found (this one).
    if _raised:
        return
    _raised.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raise Interrupted again for a signal whose first raise was swallowed: a signal that lands
    while Python runs a garbage-collection callback or a __del__ (SQLAlchemy registers such
    callbacks) only prints "Exception ignored in ..." and the work goes on (measured: the app
    then finished its trial and exited 0). Called at safe points: every training step (a
    Lightning callback, autorank.workload) and the start of every trial. Raises at most once."""
    if _raised and not _reraised:
        _reraised.append(_raised[0])
        raise Interrupted(_raised[0])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted inside the block; the old handlers come back after."""
    old = {s: signal.getsignal(s) for s in SIGNALS}
    old_hook = sys.unraisablehook
    _raised.clear()
    _reraised.clear()

    def quiet(u):  # the swallowed raise check() repeats: not "Exception ignored" + a traceback
        if not isinstance(u.exc_value, Interrupted):
            old_hook(u)

    sys.unraisablehook = quiet
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        sys.unraisablehook = old_hook
        for s, h in old.items():
            signal.signal(s, h)
