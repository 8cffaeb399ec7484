"""Stop and reload signals that arrive while ``erq serve`` starts, before its loop handles them.

Importing the server and making its event loop takes a few hundred milliseconds. Until the loop
installs its handlers, SIGHUP would kill the process (its default action) and SIGINT would end
it with a traceback; a supervisor that reloads or stops a server just spawned hits exactly that
window. ``hold()`` records them from the first thing ``erq serve`` does, and the server replays
them in order once its own handlers are in place (``take()``).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_pending: list[int] = []


def _record(signum: int, _frame: object) -> None:
    if signum not in _pending:  # a second SIGHUP before the first is replayed adds nothing
        _pending.append(signum)


def hold() -> None:
    """Record ``HELD`` signals instead of acting on them, until the server takes them."""
    for sig in HELD:
        signal.signal(sig, _record)


def take() -> list[int]:
    """The signals held so far, in order of arrival. Call it after the loop's handlers replace
    ``_record``: no signal can then be added meanwhile."""
    held = list(_pending)
    _pending.clear()
    return held


def block_in_this_thread() -> None:
    """Keep ``HELD`` signals away from the calling worker thread (an executor's initializer,
    or the first thing a thread runs). Only the main thread, which runs the loop, then takes
    them, so that blocking them there holds them for the whole process: the server's last
    step swaps their handlers that way, with no instant at which one kills it (a signal's
    default action ends the process whichever thread it lands on)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def in_worker_thread(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` as a thread's target that first calls block_in_this_thread."""

    def target(*args: Any, **kwargs: Any) -> Any:
        block_in_this_thread()
        return run(*args, **kwargs)

    return target


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block ``HELD`` signals in the calling thread for a moment; one that arrives meanwhile
    is acted on when it ends. Threads started meanwhile inherit the block and keep it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
