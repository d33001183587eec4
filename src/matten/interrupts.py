"""Stopping long commands cleanly on Ctrl-C (SIGINT) and on ``kill`` (SIGTERM).

Python turns Ctrl-C into :class:`KeyboardInterrupt`, so ``except KeyboardInterrupt`` can keep the
work done so far. SIGTERM (what ``kill``, job schedulers and container runtimes send) kills the
process at once instead, skipping every ``except`` and ``finally``. Within
:func:`sigterm_as_interrupt`, SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so one
handler serves both::

    with sigterm_as_interrupt():
        try:
            long_work()
        except KeyboardInterrupt as stop:
            save_what_was_done()
            return exit_status(stop)        # 130 after Ctrl-C, 143 after SIGTERM

:func:`interrupts_deferred` holds both signals back during a short step that must not be cut in
half (muxing a frame's packets into a video file) and delivers them when it ends.

:class:`GracefulStop` is for loops whose step is worth finishing (a training step): the first
signal only sets ``stop.requested``, so the loop can finish the step, save and return; a second
one raises :class:`KeyboardInterrupt` at once, for a user who does not want to wait.

Signal handlers can only be set from the main thread: in any other thread both context managers
do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = [
    "Terminated",
    "sigterm_as_interrupt",
    "interrupts_deferred",
    "exit_status",
    "GracefulStop",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM received within :func:`sigterm_as_interrupt`."""


def _raise_terminated(signum, frame):
    raise Terminated("terminated by SIGTERM")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(signum: int, handler) -> None:
    # getsignal/signal return None for a handler not set from Python; the default is the
    # closest thing that can be put back.
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler is restored
    when the block ends. A SIGTERM that was being ignored stays ignored."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _restore(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back within the block, then deliver them to the handlers that were
    there before (so a Ctrl-C still raises ``KeyboardInterrupt``, only later). Keep the block
    short: a user's Ctrl-C waits for it."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            _restore(s, handler)
        for s in dict.fromkeys(received):  # each signal once, in the order they came
            signal.raise_signal(s)


def exit_status(stop: BaseException) -> int:
    """The conventional exit status of a process stopped by ``stop``: 128 + the signal number,
    130 for Ctrl-C (SIGINT) and 143 for SIGTERM (:class:`Terminated`)."""
    return 128 + int(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


class GracefulStop:
    """Within ``with GracefulStop() as stop:`` the first SIGINT or SIGTERM sets
    ``stop.requested`` to the signal's name (and says on stderr what happens next); a second one
    restores the previous handlers and raises :class:`KeyboardInterrupt`."""

    def __init__(
        self,
        message: str = "finishing this step and writing a checkpoint; press "
        "Ctrl-C again to stop at once",
    ):
        self.message = message
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        self._restore_all()
        return False

    def _restore_all(self) -> None:
        for sig, handler in self._previous.items():
            _restore(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # the second signal: stop now
            self._restore_all()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.requested}: {self.message}\n")
        sys.stderr.flush()
