"""Selector for the reply side of the wire: the Cython extension or its pure-Python twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._wire import SocketWriter, value_header
else:
    from ._wire_py import SocketWriter, value_header

__all__ = ["SocketWriter", "value_header"]
