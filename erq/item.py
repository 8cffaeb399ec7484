"""Selector for the queued item type and its constructors (``new_item``; ``ITEM_MAKER``, which
the journal's read_behind makes items with): the Cython ones (not GC-tracked) or their twins."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._ring import ITEM_MAKER, Item, new_item
else:
    from ._ring_py import ITEM_MAKER, Item, new_item

__all__ = ["ITEM_MAKER", "Item", "new_item"]
