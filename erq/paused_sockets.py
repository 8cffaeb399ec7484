"""Hearing a client leave while reading from it is paused, on the event loops' transports.

A transport whose reading is paused stops watching its socket (asyncio removes its reader,
uvloop stops reading), and only a read or a write error tells it the client left. Reading is
paused behind a blocked get with a long pipeline, where nothing is written: a client that
left then went unnoticed until the get's timeout; the get could take the next item (lost with
the client) and the reads the client held open stayed open. erq's own connection layer
(erq/_fast/_epoll.pyx) keeps a paused socket in its epoll set; this does the same for the
loops' transports (the pure-Python build, and ``ERQ_NO_EPOLL=1``): one epoll set per loop,
which the loop watches, holding a duplicate of each paused socket's descriptor for
EPOLLRDHUP, not for input, so what the client sends meanwhile does not wake it. A reset
(EPOLLERR, EPOLLHUP: reported whatever is watched for) aborts the transport; a client that
shut its side is heard once (``client_left_while_paused``), as the epoll layer does.

Only pausing and resuming cost anything (a dup, an epoll_ctl, a close), never a request.
Linux only (epoll); elsewhere a paused socket is heard when reading resumes.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

try:
    from select import EPOLLERR, EPOLLHUP, EPOLLRDHUP, epoll
except ImportError:  # not Linux
    epoll = None

_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> PausedSockets


class PausedSocket:
    """One paused transport's socket in the set, until ``cancel``."""

    __slots__ = ("_set", "fd", "protocol", "transport")

    def __init__(self, paused: PausedSockets, fd: int, protocol: Any, transport: Any) -> None:
        self._set = paused
        self.fd = fd
        self.protocol = protocol
        self.transport = transport

    def cancel(self) -> None:
        """Stop watching (reading resumed, or the connection is lost); idempotent."""
        if self.fd >= 0:
            self._set.forget(self)


class PausedSockets:
    """The epoll set of one loop's paused sockets and the loop callback that serves it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = epoll()
        self._watched: dict[int, PausedSocket] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)  # the loop holds this, not the reverse

    def watch(self, protocol: Any, transport: Any, sock: Any) -> PausedSocket | None:
        try:
            # A descriptor of our own: the transport may close its own before it tells the
            # protocol, and an epoll entry is only removed through the descriptor it was
            # added with, so the socket stays open until cancel (one loop iteration at most).
            fd = os.dup(sock.fileno())
        except OSError:
            return None
        try:
            self._epoll.register(fd, EPOLLRDHUP)
        except OSError:
            os.close(fd)
            return None
        paused = PausedSocket(self, fd, protocol, transport)
        self._watched[fd] = paused
        return paused

    def forget(self, paused: PausedSocket) -> None:
        fd, paused.fd = paused.fd, -1
        del self._watched[fd]
        try:
            self._epoll.unregister(fd)
        finally:
            os.close(fd)

    def _ready(self) -> None:
        for fd, events in self._epoll.poll(0):
            paused = self._watched.get(fd)
            if paused is None:
                continue
            if events & (EPOLLERR | EPOLLHUP):  # a reset: the client is gone
                paused.cancel()
                paused.transport.abort()
            elif events & EPOLLRDHUP:
                self._epoll.modify(fd, 0)  # heard once; errors and hang-ups still come
                paused.protocol.client_left_while_paused()


def watch_paused(loop: asyncio.AbstractEventLoop, protocol: Any, transport: Any):
    """Watch ``transport``'s socket while its reading is paused, on behalf of ``protocol``;
    the handle's ``cancel`` ends it. None where it cannot be watched (not Linux)."""
    if epoll is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:  # not a socket's transport
        return None
    paused = _SETS.get(loop)
    if paused is None:
        paused = _SETS[loop] = PausedSockets(loop)
    return paused.watch(protocol, transport, sock)


__all__ = ["PausedSocket", "PausedSockets", "watch_paused"]
