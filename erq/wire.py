"""Selector for a connection's reply writer: the Cython extension or its pure-Python twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._wire import SocketWriter
else:
    from ._wire_py import SocketWriter

__all__ = ["SocketWriter"]
