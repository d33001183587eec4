"""Writing any file so that it is never half-written: a hidden temporary file beside the
target (``.<name>.<pid>-<random>.tmp``), renamed into place in one step when complete
(:func:`commit_temp`, :func:`atomic_write_path`). The process id in the name lets
:func:`remove_stale_temp_files` tell the leftover of a killed writer from a live one."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["temp_file_beside", "remove_stale_temp_files", "atomic_write_path", "commit_temp"]

# About when this process started (this module is imported as a command starts): a temporary
# file of the older naming, without a process id, that has not changed since is a leftover.
_STARTED = time.time()

# What temp_file_beside puts between ".<name>." and ".tmp": "<pid>-<random>", or only the random
# part of tempfile.mkstemp in files written before the process id was part of the name.
_TEMP_OWNER = re.compile(r"(?:(\d+)-)?[a-z0-9_]{8}")


def temp_file_beside(path) -> Path:
    """Create an empty hidden temporary file next to ``path``: ``.<name>.<pid>-<random>.tmp``.

    The process id in the name lets :func:`remove_stale_temp_files` tell the leftover of a killed
    writer from a file another process is still writing.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    return Path(tmp)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # (off POSIX os.kill(pid, 0) would end the process, not probe it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, it belongs to another user
        return True
    return True


def remove_stale_temp_files(path) -> list[Path]:
    """Delete the temporary files beside ``path`` that writers of it left when they were killed
    (``.<name>.<pid>-<random>.tmp``); returns the paths removed.

    A file is stale when its process id is no running process, or, for a file of the older
    naming without one, when it was last modified before this process started. Files of running
    processes (this one included) are kept. On a folder shared by several machines a file of a
    process on another machine looks stale: do not write the same output from two machines.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        owner = _TEMP_OWNER.fullmatch(entry.name[len(prefix) : -len(".tmp")])
        if owner is None:
            continue
        try:
            if owner.group(1) is not None:
                stale = not _process_alive(int(owner.group(1)))
            else:
                stale = entry.stat().st_mtime < _STARTED
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


@contextlib.contextmanager
def atomic_write_path(path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path``; on success it replaces ``path``.

    Parent folders are created. On any exception the temporary file is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        yield tmp
        commit_temp(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def commit_temp(tmp: Path, path: Path) -> None:
    """Move the finished temporary file ``tmp`` onto ``path`` in one step: the mode of the file
    it replaces, else 0644 like every other output (mkstemp creates 0600)."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    os.chmod(tmp, mode)
    os.replace(tmp, path)
