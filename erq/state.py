"""Selector for the server state: ``_state_py.py`` compiled by Cython (``erq._fast._state``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._state import STATUSES, Counters, Deadlines, ServerState
else:
    from ._state_py import STATUSES, Counters, Deadlines, ServerState

__all__ = ["STATUSES", "Counters", "Deadlines", "ServerState"]
