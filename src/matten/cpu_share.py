"""Processes on one machine share its cores: a CPU thread budget across processes.

torch starts as many threads as the machine has cores, in every process. Two processes that
each do so (two trainings, a training beside ``matten eval`` or a test run) oversubscribe the
cores: their OpenMP threads wait on each other's time slices, and each process keeps a fifth of
its solo speed or less (bench/contention.py). Here every busy Matten process registers itself in
a per-user folder and runs torch (and so the compiled scan kernels, which follow torch's count)
on its share of the cores: ``cores // busy processes``, at least one. A process alone keeps all
of them.

* A process registers on its first :func:`update` and holds an exclusive ``flock`` on its file
  for its lifetime, so a file whose lock can be taken belongs to a process that has ended
  (even if it was killed) and is removed. A process counts as busy while its CPU time grows
  (by at least ``BUSY_CPU_FRACTION`` of a core between two looks, read from ``/proc``): one that
  waits (a test runner waiting for its ``matten train``, a play server nobody plays) leaves its
  cores to the others. Where ``/proc`` cannot be read, and on first sight, a process counts as
  busy while it keeps calling :func:`update` (which refreshes its file's time), for
  ``BUSY_WINDOW_S``.
* :func:`update` is cheap and rate-limited (a folder listing at most once per second): the
  training loop calls it every step and the CPU scan kernels at each launch.
* The user's choice wins: with ``OMP_NUM_THREADS`` set, or ``MATTEN_SPLIT_CORES=0``, nothing is
  changed; and once torch's thread count is set by anyone else (``torch.set_num_threads``), the
  share stops managing it for good.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["CPUShare", "update"]

BUSY_WINDOW_S = 10.0  # a process that has not called update() for this long is idle
BUSY_CPU_FRACTION = 0.25  # of one core, between two looks: below it a process is waiting
UPDATE_INTERVAL_S = 1.0


def _cpu_seconds(name: str) -> float | None:
    """User + system CPU time of process ``name`` (a pid) from /proc, or None."""
    try:
        with open(f"/proc/{int(name)}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _default_folder() -> Path:
    """``MATTEN_SPLIT_CORES_DIR``, else a per-user folder in the temporary directory."""
    folder = os.environ.get("MATTEN_SPLIT_CORES_DIR")
    return Path(folder or tempfile.gettempdir()) / ("" if folder else f"matten-cpu-{os.getuid()}")


class CPUShare:
    """One process's membership of the machine-wide budget (see the module's docs).

    ``threads`` is the count the process would use alone (default: torch's count when the share
    first runs); ``folder`` is where the members register (default: a per-user folder in the
    temporary directory, or ``MATTEN_SPLIT_CORES_DIR``; tests pass their own).
    """

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        threads: int | None = None,
        interval: float = UPDATE_INTERVAL_S,
        busy_window: float = BUSY_WINDOW_S,
    ):
        self.folder = Path(folder) if folder is not None else _default_folder()
        self.solo_threads = threads
        self.interval, self.busy_window = interval, busy_window
        self.enabled = True
        self._file = None  # our registration: an open, flocked file
        self._last_set: int | None = None
        self._next_check = 0.0
        self._seen: dict[str, tuple[float, float]] = {}  # peer -> (when, its CPU seconds)
        self._lock = threading.Lock()

    # -- registration -----------------------------------------------------------------------
    def _register(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / str(os.getpid())
        handle = open(path, "a+")  # noqa: SIM115  (held open: the lock lives as long as we do)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file = handle

    def close(self) -> None:
        """Leave the budget (the others get our cores back at their next update)."""
        if self._file is not None:
            path = Path(self._file.name)
            self._file.close()
            self._file = None
            path.unlink(missing_ok=True)

    def busy_members(self, now: float | None = None) -> int:
        """How many registered processes (this one included) are busy; removes ended ones."""
        now = time.time() if now is None else now
        count = 0
        for path in self.folder.iterdir():
            if self._file is not None and path.name == str(os.getpid()):
                count += 1
                continue
            try:
                with open(path) as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:  # held: a live process
                        count += self._is_busy(path, now)
                        continue
                path.unlink(missing_ok=True)  # lock free: its process has ended
                self._seen.pop(path.name, None)
            except FileNotFoundError:  # removed meanwhile
                continue
        return max(count, 1)

    def _is_busy(self, path: Path, now: float) -> bool:
        """A live peer is busy if its CPU time grew since our last look; on first sight, or
        without /proc, if it has called update() within the busy window."""
        cpu, seen = _cpu_seconds(path.name), self._seen.get(path.name)
        if cpu is not None:
            self._seen[path.name] = (now, cpu)
            if seen is not None and now > seen[0]:
                return (cpu - seen[1]) / (now - seen[0]) >= BUSY_CPU_FRACTION
        return now - path.stat().st_mtime <= self.busy_window

    # -- the budget -------------------------------------------------------------------------
    def share(self, members: int) -> int:
        """Threads for one of ``members`` busy processes: an even split of the solo count."""
        return max(1, (self.solo_threads or 1) // max(1, members))

    def update(self, force: bool = False) -> int | None:
        """Refresh our registration and set torch's thread count to our share; the count set,
        or None when the share does not manage threads (disabled, or the user chose a count)."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if not force and now < self._next_check:
            return self._last_set
        with self._lock:
            self._next_check = now + self.interval
            current = torch.get_num_threads()
            if self._last_set is not None and current != self._last_set:
                self.enabled = False  # someone else set the count: theirs stands
                return None
            if self.solo_threads is None:
                self.solo_threads = current
            try:
                if self._file is None:
                    self._register()
                os.utime(self._file.name)
                threads = self.share(self.busy_members())
            except OSError:  # no usable folder (read-only, full): run as if alone
                threads = self.solo_threads
            if threads != current:
                torch.set_num_threads(threads)
            self._last_set = threads
            return threads


_process_share: CPUShare | None = None


def _user_chose_threads() -> bool:
    return "OMP_NUM_THREADS" in os.environ or os.environ.get("MATTEN_SPLIT_CORES", "1") == "0"


def update() -> int | None:
    """:meth:`CPUShare.update` for this process's membership (created on first call)."""
    global _process_share
    if _process_share is None:
        _process_share = CPUShare()
        _process_share.enabled = not _user_chose_threads()
        atexit.register(_process_share.close)
    return _process_share.update()
