"""Processes on one machine share its cores: a CPU thread budget across processes.

torch starts as many threads as the machine has cores, in every process. Two processes that
each do so (two trainings, a training beside ``matten eval`` or a test run) oversubscribe the
cores: their OpenMP threads wait on each other's time slices, and each process keeps a quarter
of its solo speed or less (bench/contention.py). Here every busy Matten process registers itself
in a per-user folder and runs torch (and so the compiled scan kernels, which follow torch's
count) on its share of the cores; a process alone keeps all of them.

* **Registration**: a file named by the pid, on which the process holds an exclusive ``flock``
  for its lifetime. A file whose lock can be taken belongs to a process that has ended (even if
  it was killed), and is removed.
* **Who is busy**: a peer whose CPU time grows by at least ``BUSY_CPU_FRACTION`` of a core
  between two looks (read from ``/proc``); one that waits (a test runner waiting for its
  ``matten train``, a play server nobody plays) leaves its cores to the others. On first sight,
  or without ``/proc``, a peer is busy while it keeps refreshing its file (each update does),
  for ``BUSY_WINDOW_S``.
* **The share**: ``cores // busy processes`` (this one included).
* **Cost**: :func:`update` is rate-limited (a folder listing at most once per second); the
  training loop calls it every step and the CPU scan kernels at each launch.
  ``torch.set_num_threads`` holds for the calling thread only, so the share is applied to each
  thread that calls.
* **The user's choice wins**: with ``OMP_NUM_THREADS`` set, or ``MATTEN_SPLIT_CORES=0``, nothing
  is changed; and a thread whose count is changed by anyone else after the share set it is left
  alone from then on.
* **Reproducibility**: float sums depend on the thread count, so a run beside other busy
  processes is not bit-for-bit the run it would have been alone; set ``OMP_NUM_THREADS`` (or
  ``MATTEN_SPLIT_CORES=0``) where that matters.
"""

from __future__ import annotations

import atexit
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not a POSIX system: no share, every process runs as torch sets it
    fcntl = None  # type: ignore[assignment]

__all__ = ["CPUShare", "update"]

BUSY_WINDOW_S = 10.0  # a peer that has not refreshed its file for this long is idle
BUSY_CPU_FRACTION = 0.25  # of one core, between two looks: below it a peer is waiting
UPDATE_INTERVAL_S = 1.0
MIN_SAMPLE_S = 0.5  # a peer's CPU time is compared over at least this long
FOLDER_NAME = f"matten-cpu-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _default_folder() -> Path:
    """``$MATTEN_SPLIT_CORES_DIR/matten-cpu-UID``, else that folder in the temporary directory."""
    return Path(os.environ.get("MATTEN_SPLIT_CORES_DIR") or tempfile.gettempdir()) / FOLDER_NAME


class CPUShare:
    """One process's membership of the machine-wide budget (see the module's docs).

    ``threads`` is the count the process would use alone (default: torch's count when the share
    first runs); ``folder`` is the registry (default :func:`_default_folder`; tests pass their
    own). Only the registry's own entries are ever read or removed: regular files whose names
    are process ids.
    """

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        threads: int | None = None,
        interval: float = UPDATE_INTERVAL_S,
        busy_window: float = BUSY_WINDOW_S,
    ):
        self._folder = Path(folder) if folder is not None else None
        self.solo_threads = threads
        self.interval, self.busy_window = interval, busy_window
        self.enabled = fcntl is not None
        self._fd: int | None = None  # our registration: an open, flocked file
        self._owner = os.getpid()
        self._share: int | None = None  # the process-wide share, refreshed each interval
        self._next_check = 0.0
        # peer pid -> (when sampled, its CPU seconds then, cores it used before: None unknown)
        self._seen: dict[int, tuple[float, float, float | None]] = {}
        self._lock = threading.Lock()
        self._thread = threading.local()  # per thread: the count the share last set there

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = _default_folder()
        return self._folder

    # -- registration -----------------------------------------------------------------------
    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self.folder)
        if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            raise PermissionError(f"{self.folder} is not a folder of this user's")

    def _registered(self) -> bool:
        """Our file is still there and still ours (not removed by a cleaner, say)."""
        if self._fd is None:
            return False
        try:
            return os.fstat(self._fd).st_ino == os.stat(self._path()).st_ino
        except OSError:
            return False

    def _path(self) -> Path:
        return self.folder / str(os.getpid())

    def _register(self) -> None:
        self._drop()
        self._ensure_folder()
        fd = os.open(self._path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._owner = fd, os.getpid()

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Leave the budget (the others get our cores back at their next update). In a forked
        child, which inherited the parent's registration, this leaves the parent's file alone."""
        if self._fd is None:
            return
        if os.getpid() == self._owner and self._registered():
            self._path().unlink(missing_ok=True)
        self._drop()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's registration (its file and lock stay his)."""
        if self._fd is not None:  # the parent's lock stays held through the parent's copy
            os.close(self._fd)
            self._fd = None
        self._owner, self._share, self._next_check = os.getpid(), None, 0.0
        self._seen.clear()
        self._lock = threading.Lock()

    # -- the peers --------------------------------------------------------------------------
    def _peers(self) -> list[Path]:
        """The registry's entries other than ours: regular files named by a process id."""
        peers = []
        for path in self.folder.iterdir():
            if not path.name.isdigit() or int(path.name) == os.getpid():
                continue
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    peers.append(path)
            except FileNotFoundError:
                continue
        return peers

    def _peer_usage(self, path: Path, now: float) -> float | None:
        """Cores a live peer uses (0 when it is not busy), None for busy but not yet measured;
        removes the file of an ended peer (returning 0)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return 0.0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live process
                return self._usage(int(path.name), os.fstat(fd).st_mtime, now)
            path.unlink(missing_ok=True)  # lock free: its process has ended (unlinked locked)
            self._seen.pop(int(path.name), None)
            return 0.0
        finally:
            os.close(fd)

    def _usage(self, pid: int, mtime: float, now: float) -> float | None:
        """A live peer's cores in use, from its CPU time over at least ``MIN_SAMPLE_S`` (the
        clock ticks at 10 ms: shorter spans say little); until measured, busy (None) while its
        file is fresh, else 0."""
        cpu, seen = _cpu_seconds(pid), self._seen.get(pid)
        if cpu is not None:
            if seen is None:
                self._seen[pid] = (now, cpu, None)
            elif now - seen[0] >= MIN_SAMPLE_S:
                used = (cpu - seen[1]) / (now - seen[0])
                self._seen[pid] = (now, cpu, used if used >= BUSY_CPU_FRACTION else 0.0)
            measured = self._seen[pid][2]
            if measured is not None:
                return measured
        return None if time.time() - mtime <= self.busy_window else 0.0

    def share(self, usages: list[float | None]) -> int:
        """Threads for this process beside peers using ``usages`` cores each (None: busy, not
        measured yet; 0: idle): an even split among the busy. (Not "what the peers leave": a
        peer we starve looks light, and would stay starved.)"""
        busy = sum(1 for u in usages if u is None or u > 0)
        return max(1, (self.solo_threads or 1) // (busy + 1))

    # -- the budget -------------------------------------------------------------------------
    def _refresh(self, current: int) -> int:
        """Re-register if needed, refresh our file's time, and recompute the share."""
        if self.solo_threads is None:
            self.solo_threads = current
        try:
            if not self._registered():
                self._register()
            os.utime(self._fd)
            now = time.monotonic()
            return self.share([self._peer_usage(p, now) for p in self._peers()])
        except OSError:  # no usable folder (read-only, full, not ours): run as if alone
            return self.solo_threads

    def update(self, force: bool = False) -> int | None:
        """Set torch's thread count in the calling thread to our share; the count set, or None
        when the share does not manage this thread (disabled, or someone else chose a count)."""
        if not self.enabled:
            return None
        mine = self._thread
        current = torch.get_num_threads()
        last = getattr(mine, "last_set", None)
        if getattr(mine, "stood_down", False) or (last is not None and current != last):
            mine.stood_down = True  # someone else set this thread's count: theirs stands
            return None
        now = time.monotonic()
        if force or self._share is None or now >= self._next_check:
            with self._lock:
                if force or self._share is None or now >= self._next_check:
                    self._next_check = now + self.interval
                    self._share = self._refresh(current)
        threads = self._share
        if threads != current:
            torch.set_num_threads(threads)
        mine.last_set = threads
        return threads


_process_share: CPUShare | None = None
_process_lock = threading.Lock()


def _user_chose_threads() -> bool:
    return "OMP_NUM_THREADS" in os.environ or os.environ.get("MATTEN_SPLIT_CORES", "1") == "0"


def _after_fork_in_child() -> None:
    if _process_share is not None:
        _process_share.after_fork()


def update() -> int | None:
    """:meth:`CPUShare.update` for this process's membership (created on first call); never
    raises: the share only ever makes a process run as if alone."""
    global _process_share
    if _process_share is None:
        with _process_lock:
            if _process_share is None:
                share = CPUShare()
                share.enabled = share.enabled and not _user_chose_threads()
                atexit.register(share.close)
                _process_share = share
    try:
        return _process_share.update()
    except Exception:  # noqa: BLE001  (a budget must never break a training step)
        _process_share.enabled = False
        return None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
