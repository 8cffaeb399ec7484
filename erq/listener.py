"""Selector for the memcache port's connection layer: erq's own epoll set of client sockets
(``erq._fast._epoll``, the Cython build on Linux) or the event loop's transports
(``_listener_py.py``: the pure-Python build, other platforms, or ``ERQ_NO_EPOLL=1``)."""

import os
import sys

from ._compat import USE_EXTENSIONS

NO_EPOLL: bool = os.environ.get("ERQ_NO_EPOLL", "") not in ("", "0")

if USE_EXTENSIONS and sys.platform.startswith("linux") and not NO_EPOLL:
    from ._fast._epoll import listen

    CONNECTION_LAYER = "epoll"
else:
    from ._listener_py import listen

    CONNECTION_LAYER = "loop"

__all__ = ["CONNECTION_LAYER", "listen"]
