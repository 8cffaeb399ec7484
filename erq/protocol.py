"""Selector for the protocol: ``_protocol_py.py`` compiled by Cython (``erq._fast._protocol``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._protocol import MemcacheProtocol
else:
    from ._protocol_py import MemcacheProtocol

__all__ = ["MemcacheProtocol"]
