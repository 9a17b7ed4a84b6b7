"""Hand freed heap memory back to the OS after each volume, so a long-running server's RSS stays flat.

Each request allocates and frees volumes of tens to hundreds of MB in worker threads. glibc keeps
freed chunks in its per-thread arenas (and raises its mmap threshold after large frees), so RSS
creeps up with the mix of requests although nothing leaks; ``malloc_trim(0)`` returns the free
pages. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["release_free_memory"]


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """``malloc_trim(0)`` where glibc provides it (a few milliseconds)."""
    if _TRIM is not None:
        _TRIM(0)
