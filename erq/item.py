"""Selector for the queued item type and its constructor: the Cython ones (not GC-tracked) or
their twins."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._ring import Item, new_item
else:
    from ._ring_py import Item, new_item

__all__ = ["Item", "new_item"]
