"""``AsyncClient``: the asyncio twin of ``erq.client.Client``, same API as coroutines.

Its connections are asyncio streams; what it sends and how it reads the replies are shared
with ``Client`` in ``erq._client_core`` (``set_request``, ``set_reply``, ``value_head``).

Cancelling a call (``asyncio.wait_for``, ``Task.cancel``) closes the connection it was using,
whose state is then unknown: when that was a server's reliable connection, the reads this client
held open there go back to that server's queue (their state turns to "lost").

A client may serve one event loop after another (``asyncio.run`` after ``asyncio.run``): the
connections of the earlier loop are dropped, as if the server had closed them, and opened again.
Their sockets are shut down at once (the server sees them end and puts their reads back); their
descriptors are freed when the earlier loop's transports are collected, which only that loop
could close.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence

from erq._client_core import (
    _EMPTY,
    _FAILED,
    _REFUSED,
    ABORTED,
    CONFIRMED,
    MAX_REPLY_LINE,
    Address,
    ConnectionBusy,
    ServerSpec,
    WritePolicy,
    _ClientCore,
    _ItemBase,
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

__all__ = ["AsyncClient", "AsyncItem"]


class AsyncItem(_ItemBase):
    """A reliable read of ``AsyncClient``: ``await confirm()`` / ``await abort()``."""

    __slots__ = ()

    async def confirm(self) -> bool:
        """Confirm on the server that handed it out; False when that connection broke."""
        return await self._holder().confirm(self)

    async def abort(self) -> bool:
        """Put the item back at the head of its server's queue; False when already lost."""
        return await self._holder().abort(self)


# A large request goes out in pieces this big, each given the timeout to drain.
_PIECE = 1 << 16


class _Connection(_Replies):
    """One connection to one server: a request and its reply at a time."""

    def __init__(self, node: _AsyncNode, reliable: bool) -> None:
        self.node = node
        self.reliable = reliable
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the one the streams belong to
        self._busy = threading.Lock()  # never waited on: see _Replies._alone

    def close(self) -> None:
        writer = self.writer
        if writer is not None:
            self.reader = self.writer = None
            if self._on_this_loop():
                writer.close()
            else:  # an earlier loop's (closed, maybe): shut the socket, the server sees EOF
                sock = writer.get_extra_info("socket")
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError):
                    pass
            if self.reliable:
                self.node.lose_open()

    def _on_this_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:  # no loop running
            return False

    def drop_if_closed(self) -> bool:
        """See ``erq.client._Connection.drop_if_closed``. A connection opened under another
        event loop (an earlier ``asyncio.run``) is dropped too: its streams cannot be used
        here, and a request sent on it went out before failing. Not while another task's
        request is under way."""
        writer = self.writer
        if (
            writer is not None
            and not self._busy.locked()
            and (
                not self._on_this_loop()
                or writer.is_closing()
                or peer_closed(writer.get_extra_info("socket"))
            )
        ):
            self.close()
            return True
        return False

    async def _request(self, data: bytes, wait_s: float) -> bytes:
        """Send ``data``, return the first reply line (without CRLF). Anything but a finished
        exchange or a ``SERVER_ERROR`` closes the connection (its state is unknown)."""
        node = self.node
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection(*node.address, limit=MAX_REPLY_LINE),
                    node.connect_timeout,
                )
                self.loop = asyncio.get_running_loop()
            last = await self._send_all_but_the_last_piece(data)
            return await asyncio.wait_for(self._exchange(last), node.timeout + wait_s)
        except BaseException:
            self.close()
            raise

    async def _send_all_but_the_last_piece(self, data: bytes) -> memoryview:
        """Write a large request a piece at a time, each piece given ``timeout`` to drain: the
        timeout bounds a stall, not the whole transfer (a 64 MiB put failed on a link slower
        than about 13 MB/s with the default 5 s). Returns the last piece, sent with the reply
        awaited under the request's own timeout."""
        assert self.writer is not None
        view = memoryview(data)
        while len(view) > _PIECE:
            self.writer.write(view[:_PIECE])
            view = view[_PIECE:]
            await asyncio.wait_for(self.writer.drain(), self.node.timeout)
        return view

    async def _exchange(self, data: bytes | memoryview) -> bytes:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()
        return await self._line()

    async def _line(self) -> bytes:
        assert self.reader is not None
        try:
            line = await self.reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise self._line_too_long() from None
        return line[:-2]

    async def _exactly(self, size: int) -> bytes:
        """``size`` bytes, ``timeout`` bounding each wait for more of them, not the whole
        transfer (the twin of ``erq.client._Connection._exactly``)."""
        assert self.reader is not None
        parts = []
        while size:
            part = await asyncio.wait_for(self.reader.read(size), self.node.timeout)
            if not part:
                raise EOFError("the server closed the connection")
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    async def set(self, queue: str, data: bytes, expiry: int, flags: int) -> bool:
        """True on ``STORED``, False on ``NOT_STORED``; raises ``_Refused`` on ``SERVER_ERROR``."""
        with self._alone():
            line = await self._request(set_request(queue, data, expiry, flags), 0.0)
            return self._stored(queue, line)

    async def get(self, key: str, wait_s: float) -> tuple[bytes, int] | None:
        """A single-key get: ``(data, flags)`` or None; raises ``_Refused`` on ``SERVER_ERROR``."""
        with self._alone():
            line = await self._request(b"get %s\r\n" % key.encode("ascii"), wait_s)
            flags, size = self._head(key, line)
            if flags < 0:
                return None
            try:
                block = await self._exactly(size + 2)
                end = await asyncio.wait_for(self._line(), self.node.timeout)
            except BaseException:
                self.close()
                raise
            return self._value(key, line, block, end, flags)


class _AsyncNode(_Node):
    def __init__(self, address: Address, connect_timeout: float, timeout: float) -> None:
        super().__init__(address)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.plain = _Connection(self, reliable=False)
        self.reliable = _Connection(self, reliable=True)

    def close(self) -> None:
        self.plain.close()
        self.reliable.close()
        self.lose_open()


# A connection that failed or broke (asyncio.TimeoutError is TimeoutError, an OSError).
_CONNECTION_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError)


class AsyncClient(_ClientCore):
    """The asyncio twin of ``erq.client.Client``: same arguments, same methods as coroutines."""

    _item_class = AsyncItem

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
        check_durations(connect_timeout, timeout, retry_after)
        nodes = [
            _AsyncNode(parse_server(s), connect_timeout, timeout) for s in server_list(servers)
        ]
        super().__init__(nodes, write_policy, retry_after, seed)

    async def put(self, queue: str, data: bytes, *, expiry: float = 0, flags: int = 0) -> bool:
        """See ``Client.put``."""
        check_queue_name(queue)
        data = payload(data)
        exptime, flags = expiry_seconds(expiry), item_flags(flags)
        pool = self._pool
        for node in pool.write_order():
            node.plain.drop_if_closed()
            try:
                stored = await node.plain.set(queue, data, exptime, flags)
            except _CONNECTION_ERRORS:
                pool.mark_down(node)
                continue
            except _Refused as exc:
                pool.reached(node)  # it answered
                if status_refusal(exc):
                    pool.mark_no_writes(node)
                continue
            pool.reached(node)  # back from its back-off for reads too
            if stored:
                return True
        return False

    async def get(self, queue: str, *, timeout_ms: int | None = None) -> bytes | None:
        """See ``Client.get``."""
        found = await self._fetch(queue, "", timeout_ms, reliable=False)
        return None if found is None else found[1][0]

    async def get_reliable(
        self, queue: str, *, timeout_ms: int | None = None, confirm: AsyncItem | None = None
    ) -> AsyncItem | None:
        """See ``Client.get_reliable``."""
        check_queue_name(queue)
        check_timeout_ms(timeout_ms)
        if confirm is not None:
            node = self._chain_close(queue, confirm)
            if node is not None:
                try:
                    found = await self._fetch_one(node, queue + "/close/open", 0, True, acts=True)
                except ConnectionBusy:  # nothing sent: the item is still open, here too
                    self._unchain(queue, confirm, node)
                    raise
                item = self._chained(queue, confirm, node, found)
                if item is not None:
                    return item
        found = await self._fetch(queue, "/open", timeout_ms, reliable=True)
        return None if found is None else self._opened(queue, found[0], found[1])

    async def confirm(self, item: AsyncItem) -> bool:
        """See ``Client.confirm``."""
        return await self._finish(item, "/close", CONFIRMED)

    async def abort(self, item: AsyncItem) -> bool:
        """See ``Client.abort``."""
        return await self._finish(item, "/abort", ABORTED)

    async def _finish(self, item: AsyncItem, option: str, state: str) -> bool:
        if oldest_check(item, self) is None:
            return False
        found = await self._fetch_one(item._node, item.queue + option, 0, True, acts=True)
        return self._finished(item, option, state, found)

    async def _fetch(
        self, queue: str, options: str, timeout_ms: int | None, reliable: bool
    ) -> tuple[_AsyncNode, tuple[bytes, int]] | None:
        check_queue_name(queue)
        steps = self._fetch_steps(queue, options, timeout_ms)
        done: object = None
        try:
            while True:
                step = steps.send(done)
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    done = None
                else:
                    done = await self._fetch_one(*step, reliable)
        except StopIteration as stop:
            return stop.value

    async def _fetch_one(
        self, node: _AsyncNode, key: str, wait_ms: int | None, reliable: bool, acts: bool = False
    ) -> tuple[bytes, int] | str:
        """See ``Client._fetch_one``."""
        conn = node.reliable if reliable else node.plain
        if conn.drop_if_closed() and acts:  # close() forgot the connection's open reads
            return _FAILED
        try:
            found = await conn.get(key, (wait_ms or 0) / 1000.0)
        except _CONNECTION_ERRORS:
            self._pool.mark_down(node)
            return _FAILED
        except _Refused as exc:
            self._pool.reached(node)
            if status_refusal(exc):
                self._pool.mark_no_reads(node)
            elif acts:
                return lose_reads(conn)
            return _REFUSED
        self._pool.reached(node)
        return _EMPTY if found is None else found

    async def close(self) -> None:
        """Close every connection; the servers put this client's open reads back."""
        for node in self._pool.nodes:
            node.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# Users import it from erq.client: say so in reprs and tracebacks.
AsyncClient.__module__ = "erq.client"
