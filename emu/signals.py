"""How the emulator's programs end on a signal, and why their clean-up always runs to the end.

SIGINT (Ctrl-C), SIGTERM (`kill`) and SIGHUP (the terminal closed) all stop a program as
Ctrl-C does: the first one raises Stopped in the main thread, so that every `finally` on the
way out stops the children and unlinks the segments and sockets. From then on a signal is only
noted: a second Ctrl-C, or a SIGTERM that lands 100 ms after `quit`, must not cut a clean-up
short and leave 2 GiB in /dev/shm. A clean-up outside that path (a run that ended by itself)
runs held(): a signal that comes meanwhile waits until it is done.

A signal that was ignored when the program started stays ignored, as `nohup` and the
background jobs of a script expect. Children ignore the terminal's signals, which reach the
whole process group: the program that started them stops them in order.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)  # what a terminal sends its process group


class Stopped(KeyboardInterrupt):
    """A stop signal in the main thread; a KeyboardInterrupt, so that what handles Ctrl-C
    handles SIGTERM and SIGHUP alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_noted: list[int] = []


def _note(signum: int, frame) -> None:
    _noted.append(signum)


def _stop(signum: int, frame) -> None:
    _deafen()  # a second signal must not cut the clean-up short
    raise Stopped(signum)


def _deafen() -> dict[int, object]:
    """Note the stop signals instead of acting on them; the handlers they had."""
    previous = {}
    for sig in STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, None, _note):  # None: set outside Python, leave it
            previous[sig] = signal.signal(sig, _note)
    return previous


def _restore(handlers: dict[int, object]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@contextmanager
def stopping() -> Iterator[None]:
    """Around a program's main(): the stop signals raise Stopped (those not ignored when it
    started); the handlers it found are back afterwards."""
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        _restore(previous)
        _noted.clear()  # signals after the first: the program is ending anyway


@contextmanager
def held() -> Iterator[None]:
    """A clean-up that a signal must not interrupt: a stop signal that comes meanwhile takes
    effect (with the handler it had) when the block is done; in nested blocks, the outermost.
    Handlers run only in the main thread, so another thread's clean-up needs nothing here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _deafen()
    try:
        yield
    finally:
        _restore(previous)
        due = [sig for sig in _noted if sig in previous]
        if due:
            _noted.clear()
            signal.raise_signal(due[0])


@contextmanager
def blocked(*signals: int) -> Iterator[None]:
    """Signals held back from the calling thread, and from any process it starts meanwhile,
    which inherits the mask (a child unblocks them with ignore_terminal())."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def spawning():
    """Around starting a child: the terminal's signals wait until the child ignores them, so
    that a Ctrl-C during its start-up does not kill it with a traceback."""
    return blocked(*TERMINAL_SIGNALS)


def ignore_terminal() -> None:
    """In a child: leave the terminal's signals to the program that started us, which stops
    us in order (its segments still mapped, its sockets still there)."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
