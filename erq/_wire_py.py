"""Pure-Python twin of erq._fast._wire: a connection's reply writer and a VALUE line's numbers.

The compiled writer sends a reply with one ``write()`` on the socket while the transport has
nothing queued, which spares uvloop's ~1,000 instructions of write bookkeeping per reply. In
pure Python a method of our own around ``os.write`` would cost more than the transport's C
``write``, so this twin hands every reply to the transport: the bytes on the wire, their
order and the flow control are the same.
"""

from __future__ import annotations

import select
from typing import Any


class ReplyWriter:
    """What a compiled Session hands its replies to with a C call (erq._fast._wire's, which
    erq's epoll connection and the compiled SocketWriter subclass). Here only the name: this
    build's Session calls whatever ``write`` it was given. ``lone``: see the compiled class
    (erq's epoll layer, which sets it, is compiled only)."""

    __slots__ = ()
    lone = False

    def write(self, data: bytes) -> None:
        raise NotImplementedError


class SocketWriter:
    """Write replies for one connection; ``write`` is handed to its Session."""

    __slots__ = ("write",)

    def __init__(self, transport: Any) -> None:
        self.write = transport.write


_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)


def peer_gone(fd: int) -> bool:
    """Whether the client of socket ``fd`` is gone as far as the kernel knows: it reset the
    connection or shut its side (Linux: POLLRDHUP), or the descriptor is closed. A blocked get
    is not handed an item then (PROTOCOL §5: none is lost to a dead client); it may have
    arrived in the same batch of events as the item, before the loop hears of it."""
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0))
    try:
        return any(events & _GONE for _, events in poller.poll(0))
    except OSError:
        return False


def value_header(prefix: bytes, flags: int, size: int, cas: int = -1) -> bytes:
    """``prefix`` (``b"VALUE <key> "``) then ``<flags> <size>[ <cas>]\\r\\n``, as one bytes."""
    if cas >= 0:
        return prefix + f"{flags} {size} {cas}\r\n".encode("ascii")
    return prefix + f"{flags} {size}\r\n".encode("ascii")


# The compiled twin copies a value up to this size into its VALUE block; here the pieces stay
# apart (a Python-level copy would cost more than the join saves). The bytes sent are the same.
VALUE_COPY_LIMIT = 4096


def append_value(
    out: list, prefix: bytes, flags: int, data: bytes, cas: int = -1, end: bool = False
) -> None:
    """Append a VALUE block for ``data`` to ``out``, a reply's pieces, joined when it is sent;
    with ``end`` (the last key of a get), the reply's END after it."""
    if type(out) is not list:  # as the compiled twin's typed argument
        raise TypeError(f"append_value takes a list, not {type(out).__name__}")
    out.append(value_header(prefix, flags, len(data), cas))
    out.append(data)
    out.append(b"\r\nEND\r\n" if end else b"\r\n")


def append_end(out: list) -> None:
    """Append ``END`` and its CRLF to a reply's pieces (the compiled twin may fuse it into
    the last piece; the bytes sent are the same)."""
    if type(out) is not list:  # as the compiled twin's typed argument
        raise TypeError(f"append_end takes a list, not {type(out).__name__}")
    out.append(b"END\r\n")


def clear_replies(out: list) -> None:
    """Empty a session's reply list after a flush, or the parser's request list once its
    requests ran (the compiled twin keeps the list's slot array for the next use)."""
    if type(out) is not list:  # as the compiled twin's typed argument
        raise TypeError(f"clear_replies takes a list, not {type(out).__name__}")
    out.clear()
