"""Stopping a training run cleanly on Ctrl-C or ``kill``.

Inside ``with GracefulStop() as stop:`` the first SIGINT or SIGTERM does not interrupt: it only
sets ``stop.requested`` (the signal's name), so the loop can finish the step it is in, write a
checkpoint and return. A second signal raises :class:`KeyboardInterrupt` at once, for a user who
does not want to wait. Outside the main thread (where Python cannot install signal handlers) the
block changes nothing.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop"]


class GracefulStop:
    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM),
                 message: str = "finishing this step and writing a checkpoint; press Ctrl-C "
                                "again to stop at once"):
        self.signals = tuple(signals)
        self.message = message
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # the second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.requested}: {self.message}\n")
        sys.stderr.flush()
