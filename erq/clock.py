"""Selector for the wall clock in milliseconds: the Cython extension or its pure-Python twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._clock import now_ms
else:
    from ._clock_py import now_ms

__all__ = ["now_ms"]
