"""A SIGTERM whose first raise is swallowed (it landed in a __del__ or a garbage-collection
callback: Python prints "Exception ignored" and goes on) is raised again by interrupt.check()
at the next safe point; measured before the fix: the app finished its trial and exited 0."""

import os
import signal
import time

import pytest

from autorank import interrupt
from autorank.interrupt import Interrupted, stop_on_signals


class SignalsInDel:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, inside __del__: its exception is ignored


def test_a_signal_swallowed_in_del_is_raised_again_once(recwarn):
    with stop_on_signals():
        obj = SignalsInDel()
        del obj  # no exception escapes a __del__: the raise is "ignored" (unraisable)
        with pytest.raises(Interrupted) as e:
            interrupt.check()
        assert e.value.signum == signal.SIGTERM and e.value.exit_code == 143
        interrupt.check()  # at most once: the first re-raise is being handled
    # the swallowed raise printed nothing ("Exception ignored ..." + traceback before the fix)
    assert not [w for w in recwarn if "nraisable" in type(w.message).__name__]
    interrupt.check()  # outside the block nothing is pending once it is entered again
    with stop_on_signals():
        interrupt.check()  # a fresh block starts clean


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_training_step_checks_for_a_swallowed_signal():
    """The Lightning callback every autorank Trainer has (workload.base.make_trainer)."""
    from autorank.workload.base import StopCheck, make_trainer

    trainer = make_trainer(1, "cpu", "/tmp", False)
    assert any(isinstance(c, StopCheck) for c in trainer.callbacks)
    with stop_on_signals():
        obj = SignalsInDel()
        del obj
        with pytest.raises(Interrupted):
            StopCheck().on_train_batch_end(trainer, None, None, None, 0)
