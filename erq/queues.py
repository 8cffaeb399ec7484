"""Selector for the queue collection: ``_queues_py.py`` compiled (``erq._fast._queues``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._queues import QueueCollection, RecoveryStopped
else:
    from ._queues_py import QueueCollection, RecoveryStopped

__all__ = ["QueueCollection", "RecoveryStopped"]
