"""Selector for the queue: ``_queue_py.py`` compiled by Cython (``erq._fast._queue``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._queue import ITEM_OVERHEAD, NOT_STORED, STORED, AddResult, OpenRead, Queue, Waiter
else:
    from ._queue_py import ITEM_OVERHEAD, NOT_STORED, STORED, AddResult, OpenRead, Queue, Waiter

__all__ = ["ITEM_OVERHEAD", "NOT_STORED", "STORED", "AddResult", "OpenRead", "Queue", "Waiter"]
