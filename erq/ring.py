"""Selector for the ring-buffer FIFO: the Cython extension or its pure-Python twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._ring import ITEM_OVERHEAD, Item, Ring
else:
    from ._ring_py import ITEM_OVERHEAD, Item, Ring

__all__ = ["ITEM_OVERHEAD", "Item", "Ring"]
