"""Stop and reload signals that arrive while ``erq serve`` starts, before its loop handles them.

Importing the server and making its event loop takes a few hundred milliseconds. Until the loop
installs its handlers, SIGHUP would kill the process (its default action) and SIGINT would end
it with a traceback; a supervisor that reloads or stops a server just spawned hits exactly that
window. ``hold()`` records them from the first thing ``erq serve`` does, and the server replays
them in order once its own handlers are in place (``take()``).
"""

from __future__ import annotations

import signal

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
