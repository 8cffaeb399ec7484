"""TCP keepalive on client connections (``tcp_keepalive``, Redis's ``tcp-keepalive``).

A client whose host dies or drops off the network sends no FIN and no RST: the server never
hears from it again, and without keepalive its connection stays until the server restarts,
with its open reads reserved (PROTOCOL section 5 returns them on a disconnect, and this is one
the server would otherwise never see) and its set still arriving holding room in
``max_pending_data``. With keepalive the kernel probes a connection idle for the set time and,
after PROBES unanswered probes a third of that apart, reports it gone: it then closes like any
other and its reads go back to the head of their queues, within about twice the set time.

Keepalive does not probe a connection with data in flight: there the kernel retransmits, for
~15 min by default, before it gives up; a worker whose host died before it acknowledged the
item it was handed would keep that read as long. ``TCP_USER_TIMEOUT`` bounds that wait by the
same time (and so closes a client that has taken nothing sent to it for that long: it is
gone, or stuck)."""

from __future__ import annotations

import logging
import socket
from typing import Any

from erq.throttle import Throttle

log = logging.getLogger("erq.protocol")
_failed = Throttle(log, logging.WARNING)

PROBES = 3


def options(idle_s: int) -> list[tuple[int, int, int]]:
    """The socket options that probe a connection idle for ``idle_s`` seconds, PROBES times
    a third of that apart, and give up on data unacknowledged as long (where the platform lets
    them be set)."""
    interval = max(1, idle_s // PROBES)
    chosen = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle_option is not None:  # TCP_KEEPALIVE: macOS's name for it
        chosen.append((socket.IPPROTO_TCP, idle_option, idle_s))
    if hasattr(socket, "TCP_KEEPINTVL"):
        chosen.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval))
    if hasattr(socket, "TCP_KEEPCNT"):
        chosen.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, PROBES))
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        gone_after_ms = (idle_s + PROBES * interval) * 1000
        chosen.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, gone_after_ms))
    return chosen


def enable(transport: Any, idle_ms: int) -> None:
    """Turn keepalive on for a client's TCP socket, probing after ``idle_ms`` (rounded up to
    whole seconds). A socket that refuses is left as it is, with a throttled warning."""
    setter = getattr(transport, "set_socket_option", None)  # erq's epoll layer
    if setter is None:
        sock = transport.get_extra_info("socket")
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return  # none, or not TCP
        setter = sock.setsockopt
    idle_s = max(1, -(-idle_ms // 1000))  # config keeps it within Linux's 32,767 s
    try:
        for level, name, value in options(idle_s):
            setter(level, name, value)
    except OSError as exc:
        _failed.log("cannot turn TCP keepalive on for a client (%s)", exc)


__all__ = ["PROBES", "enable", "options"]
