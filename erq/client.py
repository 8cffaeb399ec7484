"""A client for several erq servers (PROTOCOL.md §9): spread writes, fan reads in.

Servers never talk to each other, so the client makes them one loosely ordered queue: writes go
to one server chosen at random or round robin, reads stick to one server until it is empty, and a
reliable read is confirmed or aborted on the connection that handed it out. Hash-based memcache
clients cannot do that last part: they hash the whole key, and ``q/open`` and ``q/close`` may land
on different servers.

``Client`` is synchronous, on blocking sockets (one connection per server for ``put``/``get``,
and one for reliable reads so that a plain ``get`` of the same queue can never abort them,
PROTOCOL §5). ``AsyncClient`` (``erq._client_async``) is its asyncio twin with the same API as
coroutines. Both speak the few memcache text commands they need themselves (``set`` and
single-key ``get`` with exact byte counts), with the replies read by the same functions
(``erq._client_core``, with all else the two share).

Failures: a server that cannot be reached is skipped for ``retry_after`` seconds; a server that
refuses writes (``READONLY``, ``QUIESCENT``) or reads (``QUIESCENT``) is skipped for that long for
those. A connection the server closed while it was idle (a restart, its ``client_timeout``) is
noticed before it is used and opened again. A blocking read (``timeout_ms``) lasts its wait even
while every server is skipped, retrying those whose time is up, so a consumer's loop never spins.
Only replies that mean a bug or a misuse (``CLIENT_ERROR``, ``ERROR``, garbage) raise, as
``ErqError``. Delivery is at least once: a reliable read that was open on a connection that broke
goes back to its server's queue, and its ``confirm()``/``abort()`` return False. False means the
outcome is unknown, not that the item will come again: when no reply came in time, a hung server
may still have confirmed it when it woke up.

A server's ``open_timeout`` takes a read back without telling its client. The ``/close`` that a
``confirm()`` of that item sends later is used up by it and confirms nothing (never a later read
the connection holds), but the server answers it as any other, so ``confirm()`` still returns
True and the item is delivered again: confirm well within that time.

Servers in Kestrel's wire mode (``--compat kestrel``, and Kestrel itself) name the bare queue in
their ``VALUE`` lines; both clients take that as the answer to the key they sent.

A ``SERVER_ERROR`` leaves the connection open, as the server does: a QUIESCENT server refuses
the client's reads while the reads it holds open there can still be confirmed, which is how a
server is drained.

Neither client is safe to share between threads (or, for ``AsyncClient``, between tasks that call
it at the same time): give each worker its own. A request to a server while another thread's or
task's is under way on that connection raises RuntimeError before it is sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from erq._client_core import (
    _CONNECTION_ERRORS,
    _EMPTY,
    _FAILED,
    _REFUSED,
    ABORTED,
    CONFIRMED,
    MAX_REPLY_LINE,
    Address,
    ConnectionBusy,
    ErqError,
    Item,
    ServerSpec,
    WritePolicy,
    _ClientCore,
    _Node,
    _Refused,
    _Replies,
    check_durations,
    check_queue_name,
    check_timeout_ms,
    expiry_seconds,
    item_flags,
    lose_reads,
    oldest_check,
    parse_server,
    payload,
    peer_closed,
    server_list,
    set_request,
    status_refusal,
)

if TYPE_CHECKING:
    from erq._client_async import AsyncClient

__all__ = ["AsyncClient", "Client", "ErqError", "Item", "ServerSpec", "WritePolicy"]

# Defined in the shared core, but this is where users import them from: say so in reprs,
# tracebacks and pickles.
ErqError.__module__ = Item.__module__ = __name__


# The most one recv asks for: it allocates that much first, and a VALUE line may declare any
# size (one of 1 TiB raised MemoryError before a byte of it came).
_MOST_PER_RECV = 1 << 20


class _Connection(_Replies):
    """One connection to one server, a request and its reply at a time, on a blocking socket
    (twin of ``erq._client_async._Connection``)."""

    def __init__(self, node: _SyncNode, reliable: bool) -> None:
        self.node = node
        self.reliable = reliable
        self.sock: socket.socket | None = None
        self._busy = threading.Lock()
        # What came and is not read yet: a bytearray grows in place (bytes += copied it all
        # for each recv, quadratic over a large value).
        self.buf = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.buf = bytearray()
            if self.reliable:
                self.node.lose_open()

    def drop_if_closed(self) -> bool:
        """Close the socket if the server has closed its end (a restart, ``client_timeout``):
        an idle connection is never readable otherwise, and a request sent on a dead one
        would count as the server failing. The next request connects again. Not while another
        thread's request is under way: its reply makes the socket readable."""
        if self.sock is not None and not self._busy.locked() and peer_closed(self.sock):
            self.close()
            return True
        return False

    def _line(self) -> bytes:
        assert self.sock is not None
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_REPLY_LINE:
                raise self._line_too_long()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        assert self.sock is not None
        while len(self.buf) < size:
            chunk = self.sock.recv(min(max(65536, size - len(self.buf)), _MOST_PER_RECV))
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk
        block = bytes(self.buf[:size])
        del self.buf[:size]
        return block

    def _send(self, data: bytes) -> None:
        """``sendall``, but the socket's timeout bounds each wait for room, not the whole
        transfer (``sendall``'s covers it all: a 64 MiB put failed on a link slower than
        about 13 MB/s with the default 5 s)."""
        assert self.sock is not None
        view = memoryview(data)
        while view:
            view = view[self.sock.send(view) :]

    def _request(self, data: bytes, wait_s: float) -> bytes:
        """Send ``data``, return the first reply line (without CRLF)."""
        node = self.node
        try:
            if self.sock is None:
                self.sock = socket.create_connection(node.address, node.connect_timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(node.timeout + wait_s)
            self._send(data)
            return self._line()
        except BaseException:  # failed, timed out or interrupted: a reply still due must
            self.close()  # not be read as the next request's
            raise

    def set(self, queue: str, data: bytes, expiry: int, flags: int) -> bool:
        """True on ``STORED``, False on ``NOT_STORED``; raises ``_Refused`` on ``SERVER_ERROR``."""
        with self._alone():
            line = self._request(set_request(queue, data, expiry, flags), 0.0)
            return self._stored(queue, line)

    def get(self, key: str, wait_s: float) -> tuple[bytes, int] | None:
        """A single-key get: ``(data, flags)`` or None; raises ``_Refused`` on ``SERVER_ERROR``."""
        with self._alone():
            line = self._request(b"get %s\r\n" % key.encode("ascii"), wait_s)
            flags, size = self._head(key, line)
            if flags < 0:
                return None
            try:
                block, end = self._exactly(size + 2), self._line()
            except BaseException:
                self.close()
                raise
            return self._value(key, line, block, end, flags)


class _SyncNode(_Node):
    def __init__(self, address: Address, connect_timeout: float, timeout: float) -> None:
        super().__init__(address)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.plain = _Connection(self, reliable=False)  # no socket until the first request
        self.reliable = _Connection(self, reliable=True)

    def close(self) -> None:
        self.plain.close()
        self.reliable.close()
        self.lose_open()


class Client(_ClientCore):
    """A synchronous client for several erq servers (see the module docstring)."""

    _item_class = Item

    def __init__(
        self,
        servers: Sequence[ServerSpec] | ServerSpec,
        *,
        write_policy: WritePolicy = "random",
        connect_timeout: float = 1.0,
        timeout: float = 5.0,
        retry_after: float = 5.0,
        seed: int | None = None,
    ) -> None:
        """``timeout`` bounds each wait on a server: for a reply (a blocking read adds its
        own wait to it), and for room to send or more bytes while an item moves, so that a
        large item on a slow link takes as long as it needs while it makes progress;
        ``retry_after`` is how long a server that failed or refused is skipped; ``seed`` makes
        the random write policy repeatable."""
        check_durations(connect_timeout, timeout, retry_after)
        nodes = [_SyncNode(parse_server(s), connect_timeout, timeout) for s in server_list(servers)]
        super().__init__(nodes, write_policy, retry_after, seed)

    # ---- writes ---------------------------------------------------------------------------
    def put(self, queue: str, data: bytes, *, expiry: float = 0, flags: int = 0) -> bool:
        """Enqueue on one server (per the write policy), moving on to the next while servers
        fail or refuse (READONLY, full queue). True only after a ``STORED``; False when every
        server failed or refused. A write whose reply was lost may have been stored there and
        is tried elsewhere too: delivery is at least once.

        ``expiry``: seconds the item lives, 0 for ever; up to 30 days (2,592,000; 1,000,000
        in Kestrel's wire mode) relative, larger an absolute Unix time (PROTOCOL §6); a
        fraction rounds up. ``flags``: a number
        from 0 to 2**32 - 1 kept with the item. Either out of range (a negative expiry, which
        the server would store already expired) raises ValueError, a bool or a non-number
        TypeError, before any request."""
        check_queue_name(queue)
        data = payload(data)
        exptime, flags = expiry_seconds(expiry), item_flags(flags)
        pool = self._pool
        for node in pool.write_order():
            node.plain.drop_if_closed()
            try:
                stored = node.plain.set(queue, data, exptime, flags)
            except _CONNECTION_ERRORS:
                pool.mark_down(node)
                continue
            except _Refused as exc:  # read only, too large, journal error
                pool.reached(node)  # it answered
                if status_refusal(exc):
                    pool.mark_no_writes(node)
                continue
            pool.reached(node)  # back from its back-off for reads too
            if stored:
                return True
            # NOT_STORED: this server's queue is full or its item limit is lower; try another.
        return False

    # ---- reads ----------------------------------------------------------------------------
    def get(self, queue: str, *, timeout_ms: int | None = None) -> bytes | None:
        """Dequeue, sticking to one server until it is empty, then moving to the next.

        Without ``timeout_ms``: None once every reachable server was found empty. With it: when
        every server is empty, one blocking read (``/t=``) on the next server in turn, so the
        call returns within about ``timeout_ms`` plus one round trip per server; a server that
        takes connections but does not answer (stopped, hung) costs up to ``timeout`` more,
        once per ``retry_after`` (then it counts as down). It is from 0 to 2**31 - 1
        (Kestrel's limit): another raises ValueError (a non-number TypeError) before any
        request.

        A plain get takes the item off the server before its reply is sent: if the connection
        breaks, or the call is interrupted, after the server took it and before the value was
        read here, the item is gone. Use ``get_reliable`` for items that must not be lost.
        """
        found = self._fetch(queue, "", timeout_ms, reliable=False)
        return None if found is None else found[1][0]

    def get_reliable(
        self, queue: str, *, timeout_ms: int | None = None, confirm: Item | None = None
    ) -> Item | None:
        """A reliable read (``/open``), chosen like ``get``; the item must be confirmed or
        aborted, on this client, oldest first per queue and server.

        ``confirm``: an open item of the same queue to confirm in the same round trip
        (``get q/close/open`` on its server, the worker loop); afterwards its ``state`` says
        whether that worked ("confirmed") or its connection had broken ("lost").
        """
        check_queue_name(queue)
        check_timeout_ms(timeout_ms)
        if confirm is not None:
            node = self._chain_close(queue, confirm)
            if node is not None:
                try:
                    found = self._fetch_one(node, queue + "/close/open", 0, True, acts=True)
                except ConnectionBusy:  # nothing sent: the item is still open, here too
                    self._unchain(queue, confirm, node)
                    raise
                item = self._chained(queue, confirm, node, found)
                if item is not None:
                    return item
        found = self._fetch(queue, "/open", timeout_ms, reliable=True)
        return None if found is None else self._opened(queue, found[0], found[1])

    def confirm(self, item: Item) -> bool:
        """``get q/close`` on the item's server; False when the item was lost (see ``Item``)."""
        return self._finish(item, "/close", CONFIRMED)

    def abort(self, item: Item) -> bool:
        """``get q/abort`` on the item's server: the item goes back to the head of its queue."""
        return self._finish(item, "/abort", ABORTED)

    def _finish(self, item: Item, option: str, state: str) -> bool:
        if oldest_check(item, self) is None:
            return False
        found = self._fetch_one(item._node, item.queue + option, 0, True, acts=True)
        return self._finished(item, option, state, found)

    def _fetch(
        self, queue: str, options: str, timeout_ms: int | None, reliable: bool
    ) -> tuple[_SyncNode, tuple[bytes, int]] | None:
        """Sticky read (``_read_plan``): the node that had an item and the item, or None."""
        check_queue_name(queue)
        steps = self._fetch_steps(queue, options, timeout_ms)
        done: object = None
        try:
            while True:
                step = steps.send(done)
                if isinstance(step, float):
                    time.sleep(step)
                    done = None
                else:
                    done = self._fetch_one(*step, reliable)
        except StopIteration as stop:
            return stop.value

    def _fetch_one(
        self, node: _SyncNode, key: str, wait_ms: int | None, reliable: bool, acts: bool = False
    ) -> tuple[bytes, int] | str:
        """One single-key get: ``(data, flags)``, ``_EMPTY``, ``_FAILED`` or ``_REFUSED``.
        ``acts``: it closes or aborts a read open on the reliable connection, so it is not
        sent on a new one (the reads were lost with the old one)."""
        conn = node.reliable if reliable else node.plain
        if conn.drop_if_closed() and acts:  # close() forgot the connection's open reads
            return _FAILED
        try:
            found = conn.get(key, (wait_ms or 0) / 1000.0)
        except _CONNECTION_ERRORS:
            self._pool.mark_down(node)
            return _FAILED
        except _Refused as exc:  # quiescent, starting, journal error
            self._pool.reached(node)
            if status_refusal(exc):
                self._pool.mark_no_reads(node)
            elif acts:
                return lose_reads(conn)
            return _REFUSED
        self._pool.reached(node)
        return _EMPTY if found is None else found

    # ---- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection; the servers put this client's open reads back."""
        for node in self._pool.nodes:
            node.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    # AsyncClient lives in its own module, imported on first use (it needs this one).
    if name == "AsyncClient":
        from erq._client_async import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
