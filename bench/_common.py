"""Small helpers shared by the benchmarks: timing and peak memory of one call in a fresh process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

# glibc keeps freed blocks mapped once its mmap threshold has grown, so resident memory would stop
# falling after the first large free and later peaks would read as zero. A fixed threshold makes
# every large block go back to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def reexec_with_returning_malloc() -> None:
    """Restart this script with :data:`MALLOC_ENV` unless it is already set."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(script: str, *args: str) -> float:
    """Run ``script --peak-memory args`` in a new process; it prints the peak extra bytes (MB)."""
    out = subprocess.run(
        [sys.executable, script, "--peak-memory", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **MALLOC_ENV},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def sampled_peak(fn) -> tuple[float, float]:
    """Run ``fn`` once while a thread samples resident memory every millisecond: returns
    (seconds, largest growth in MB over the memory in use before the call)."""
    before = current_rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    return elapsed, (max(peak[0], current_rss_bytes()) - before) / 2**20


def report_peak(fn) -> None:
    """Child side of :func:`peak_extra_memory`: one warm-up call (compilation, caches), then the
    sampled peak of a second call, printed as JSON."""
    fn()
    print(json.dumps({"peak_mb": sampled_peak(fn)[1]}))


def print_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: (
        "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |"
    )  # noqa: E731
    text = "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )
    print(text)
    return text


def read_json(path) -> dict:
    """A JSON record, or {} when it is missing or unreadable (a run not evaluated yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_json(path, value: dict) -> None:
    """Write a JSON record atomically (a temporary file renamed into place)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def options_suffix(extra: list[str]) -> str:
    """ "" without options, else "-" and a short hash of them: runs trained with other ``--set``
    options get folders of their own."""
    if not extra:
        return ""
    return "-" + hashlib.sha256("\n".join(extra).encode()).hexdigest()[:8]
