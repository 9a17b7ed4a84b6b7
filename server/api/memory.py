"""Hand freed heap memory back to the OS when it piles up, so a long-running server's RSS stays bounded.

Each request allocates and frees volumes of tens to hundreds of MB in worker threads. glibc keeps
freed chunks in its per-thread arenas (and raises its mmap threshold after large frees), so RSS
creeps up with the mix of requests although nothing leaks; ``malloc_trim(0)`` returns the free
pages. Trimming after every request has a price, though: the next request touches those pages
afresh, and the page faults cost a 1 mm brain ~0.05 s (a tenth of its REST time, measured with
``bench/bench_api.py``). So ``HeapTrimmer`` keeps up to ``retain`` bytes of RSS above the lowest
level a trim reached, and trims only beyond that. Elsewhere (musl, macOS) trimming is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["HeapTrimmer", "release_free_memory", "rss_bytes"]


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_memory() -> None:
    """``malloc_trim(0)`` where glibc provides it (a few milliseconds, plus the next request's page faults)."""
    if _TRIM is not None:
        _TRIM(0)


def rss_bytes() -> int | None:
    """This process's resident set size (``/proc/self/statm``), or None where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """``after_request()``: trim when RSS exceeds the lowest post-trim RSS by more than ``retain`` bytes.

    ``retain=0`` trims after every request. Without procfs the RSS is unknown and every call trims.
    """

    def __init__(self, retain: int) -> None:
        self.retain = retain
        self.floor: int | None = None  # the lowest RSS measured right after a trim
        self.trims = 0
        self._lock = threading.Lock()

    def after_request(self) -> bool:
        """Trim if the retained memory is beyond the allowance; True when it trimmed."""
        with self._lock:
            rss = rss_bytes()
            if rss is not None and self.floor is not None and rss <= self.floor + self.retain:
                return False
            release_free_memory()
            self.trims += 1
            after = rss_bytes()
            if after is not None:
                self.floor = after if self.floor is None else min(self.floor, after)
            return True
