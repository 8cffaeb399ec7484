"""Selector for the queue: ``_queue_py.py`` compiled by Cython (``erq._fast._queue``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._queue import (
        EXPIRY_BATCH,
        ITEM_OVERHEAD,
        NOT_STORED,
        STORED,
        AddResult,
        ExpiryBacklog,
        ItemMemory,
        OpenRead,
        Queue,
        Waiter,
    )
else:
    from ._queue_py import (
        EXPIRY_BATCH,
        ITEM_OVERHEAD,
        NOT_STORED,
        STORED,
        AddResult,
        ExpiryBacklog,
        ItemMemory,
        OpenRead,
        Queue,
        Waiter,
    )

__all__ = [
    "EXPIRY_BATCH",
    "ITEM_OVERHEAD",
    "NOT_STORED",
    "STORED",
    "AddResult",
    "ExpiryBacklog",
    "ItemMemory",
    "OpenRead",
    "Queue",
    "Waiter",
]
