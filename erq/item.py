"""Selector for the queued item type: the Cython one (not GC-tracked) or its twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._ring import Item
else:
    from ._ring_py import Item

__all__ = ["Item"]
