"""Selector for the session: ``_session_py.py`` compiled by Cython (``erq._fast._session``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._session import (
        MAX_PENDING,
        MAX_PENDING_BYTES,
        OUT_BUDGET,
        REQUESTS_PER_PASS,
        SLOW_OPS_PER_PASS,
        SYNC_FAILED,
        Session,
    )
else:
    from ._session_py import (
        MAX_PENDING,
        MAX_PENDING_BYTES,
        OUT_BUDGET,
        REQUESTS_PER_PASS,
        SLOW_OPS_PER_PASS,
        SYNC_FAILED,
        Session,
    )

__all__ = [
    "MAX_PENDING",
    "MAX_PENDING_BYTES",
    "OUT_BUDGET",
    "REQUESTS_PER_PASS",
    "SLOW_OPS_PER_PASS",
    "SYNC_FAILED",
    "Session",
]
