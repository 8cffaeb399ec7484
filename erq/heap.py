"""The server's memory: the C heap (one malloc arena, free pages handed back), and the
cyclic GC paused over bursts of allocation.

Items larger than pymalloc's 512 bytes live in glibc's heap, which keeps what is freed:

- Each thread that allocates gets an arena of its own. Recovery reads the queues' heads into
  memory on a worker thread, so after a restart they sit in that thread's arena; as clients
  drain the queue, the loop thread's refills take new memory from the main arena while the
  worker's stays resident, free and unused. After a restart over 1,000,000 x 1 KiB items at
  ``max_memory_size = "64MiB"`` (98 MB once ready), the drain peaked at 184-188 MB; with one
  arena for every thread, at 123 MB. The threads hardly contend for it: they allocate
  holding the GIL.
- ``free`` gives pages back only from the top of the heap: a drained queue's pages stay
  resident below longer-lived blocks until ``malloc_trim`` releases them (the server's sweep
  does, ``Server._trim_after_drain``: that queue, empty, held 103-165 MB; now 34 MB).

Both through ctypes, imported only when first needed, and without ``ctypes.util``, whose
``find_library`` imports cost ~3 MiB of RSS: the process's own symbols include the C
library's. Elsewhere than glibc (musl, macOS) there is no ``malloc_trim``, and both are no-ops.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter for the number of arenas


@functools.cache
def _glibc() -> Any:
    """The process's C library symbols when they include glibc's malloc_trim, else None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim, option = libc.malloc_trim, libc.mallopt
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    option.argtypes = [ctypes.c_int, ctypes.c_int]
    option.restype = ctypes.c_int
    return libc


def one_arena() -> bool:
    """Have threads started from now on allocate from the main arena, unless the operator
    chose with ``MALLOC_ARENA_MAX``. True if set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (every arena's); False if it cannot
    (not glibc). They are faulted in again, zeroed, if malloc reuses them."""
    libc = _glibc()
    if libc is None:  # pragma: no cover - not glibc
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic GC off meanwhile: for work that allocates container objects by the hundred
    thousand and makes no cycles (recovery; a reload's spill, whose record tuples and
    positions cost it half its time in collections that walked the queue's items). The
    garbage goes by reference counting as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
