"""Process memory tuning for glibc: how many malloc arenas the server keeps, and handing freed pages back.

The server's memory must follow its load: a burst of sessions allocates large transient buffers on
many threads (decode and encode threads, the inference worker, runtime thread pools), and glibc
keeps what they free unless told otherwise, so the resident size would stay at the peak of the
busiest minute although nothing leaks (docs/performance-service.md measures both effects). Both
calls are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """Looked up once: ``find_library`` runs ``ldconfig`` (about 1.3 ms), and ``release_free_memory``
    runs on the event loop whenever the last session closes."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def limit_malloc_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas (``mallopt(M_ARENA_MAX)``); returns whether the cap was set. Call it
    before the worker threads exist.

    glibc gives threads their own arenas (up to 8 per core); decode/encode threads, the inference
    worker and runtime threads each keep freed pages in theirs, which ``malloc_trim`` does not always
    return, so RSS crept up with every burst of sessions (docs/performance-service.md). With a
    couple of arenas it stays flat. An explicit ``MALLOC_ARENA_MAX`` in the environment wins.
    """
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> None:
    """Hands freed heap pages back to the OS (glibc ``malloc_trim``), e.g. once the last session is gone
    or after a warm-up.

    Batched inference of many sessions allocates large transient buffers; glibc keeps the freed
    pages, so without this the server's RSS stays at its peak after a burst of sessions although
    nothing is leaked.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
