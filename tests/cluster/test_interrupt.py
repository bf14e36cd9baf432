"""The CLI's signal handling, in-process: stop signals raise ``Interrupted`` at once, except
inside a write to the tracking store, where they wait for the write to finish."""

import os
import signal
import time

import pytest

from raylens.cluster.interrupt import stop_on_signals
from raylens.interrupts import Interrupted, deferred_interrupts, pending


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_raises_interrupted_with_the_shell_exit_code(signum: int, code: int) -> None:
    with pytest.raises(Interrupted) as raised, stop_on_signals():
        deliver(signum)
    assert raised.value.signum == signum and raised.value.exit_code == code


def test_a_signal_during_a_write_waits_for_the_write() -> None:
    finished = []
    with pytest.raises(Interrupted) as raised, stop_on_signals(), deferred_interrupts():
        with deferred_interrupts():  # nested writes: held until the outermost ends
            deliver(signal.SIGTERM)
            finished.append("inner")
        assert pending()
        finished.append("outer")
    assert finished == ["inner", "outer"] and raised.value.signum == signal.SIGTERM
    assert not pending()


def test_the_previous_handlers_come_back() -> None:
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with stop_on_signals():
        pass
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
