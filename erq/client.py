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
single-key ``get`` with exact byte counts), with the replies read by the same functions here.

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

A server's ``open_timeout`` takes a read back without telling its client, and the protocol's
``/close`` confirms the connection's oldest open read, whichever that is now: confirm well within
that time, or the confirmation lands on a later read.

Servers in Kestrel's wire mode (``--compat kestrel``, and Kestrel itself) name the bare queue in
their ``VALUE`` lines; both clients take that as the answer to the key they sent.

A ``SERVER_ERROR`` leaves the connection open, as the server does: a QUIESCENT server refuses
the client's reads while the reads it holds open there can still be confirmed, which is how a
server is drained.

Neither client is safe to share between threads (or, for ``AsyncClient``, between tasks that call
it at the same time): give each worker its own.
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from erq.names import valid_queue_name

if TYPE_CHECKING:
    from erq._client_async import AsyncClient

__all__ = ["AsyncClient", "Client", "ErqError", "Item", "ServerSpec", "WritePolicy"]

DEFAULT_PORT = 22133
ServerSpec = str | tuple[str, int]
WritePolicy = Literal["random", "round_robin"]
Address = tuple[str, int]

# Item states. An item is OPEN until it is confirmed or aborted, or LOST when the connection that
# held it broke (the server has put it back at the head of its queue: PROTOCOL §5).
OPEN = "open"
CONFIRMED = "confirmed"
ABORTED = "aborted"
LOST = "lost"


class ErqError(Exception):
    """A server answered what a correct request never gets (``CLIENT_ERROR``, ``ERROR``, garbage).

    Outages and refusals never raise: the client moves to another server instead.
    """


def status_refusal(error: Exception) -> bool:
    """A ``SERVER_ERROR`` that refuses everything of its kind for a while (READONLY, QUIESCENT,
    a server still starting): skip that server for ``retry_after``. Others (item too large,
    journal error) concern one request only."""
    text = str(error)
    return any(word in text for word in ("read only", "quiescent", "starting"))


def parse_server(spec: ServerSpec) -> Address:
    """``"host:port"``, ``"host"`` (port 22133) or ``(host, port)`` -> ``(host, port)``."""
    if isinstance(spec, tuple):
        host, port = spec
        return str(host), int(port)
    if spec.startswith("[") and "]" in spec:  # "[::1]:22133" or "[::1]"
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
    if spec.count(":") > 1:  # a bare IPv6 address: its colons are not a port
        return spec, DEFAULT_PORT
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, DEFAULT_PORT
    return host, int(port)


def server_list(servers: Sequence[ServerSpec] | ServerSpec) -> list[ServerSpec]:
    """One server given alone (``"host:port"`` or ``(host, port)``) or a sequence of them."""
    if isinstance(servers, str) or (
        isinstance(servers, tuple) and len(servers) == 2 and isinstance(servers[1], int)
    ):
        return [servers]
    return list(servers)


def peer_closed(sock: Any) -> bool:
    """Whether an idle connection's server has closed it: the protocol never sends unasked,
    so an idle socket that reads as ready holds an end of stream (or a reset)."""
    try:
        if hasattr(select, "poll"):  # select() fails on descriptors past FD_SETSIZE
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed under us: as good as closed by the server
        return True


def check_queue_name(queue: str) -> bytes:
    """The protocol's name rule (PROTOCOL §1), checked here so a bad name fails before any I/O."""
    try:
        raw = queue.encode("ascii")
    except UnicodeEncodeError:
        raw = b""  # not ASCII: never a name
    if not valid_queue_name(raw):
        raise ValueError(f"bad queue name {queue!r}")
    return raw


class _Node:
    """What the client knows of one server, whatever its transport."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.down_until = 0.0  # monotonic: unreachable, skip everything until then
        self.no_writes_until = 0.0  # refused a write (READONLY, QUIESCENT)
        self.no_reads_until = 0.0  # refused a read (QUIESCENT)
        # queue -> this client's open reads on the reliable connection, oldest first: the
        # protocol confirms and aborts the oldest, so the client keeps the same order.
        self.open: dict[str, deque[_ItemBase]] = {}

    def lose_open(self) -> None:
        """The reliable connection broke: the server put its open reads back; forget them."""
        for items in self.open.values():
            for item in items:
                item.state = LOST
        self.open.clear()


_MIN_PAUSE = 0.05  # a blocking read retries a server that refused it without back-off this often


class _Pool:
    """Server choice, shared by both clients: write policy, sticky read cursors, back-off."""

    def __init__(
        self,
        nodes: list[Any],
        write_policy: WritePolicy,
        retry_after: float,
        seed: int | None,
    ) -> None:
        if not nodes:
            raise ValueError("at least one server is needed")
        if write_policy not in ("random", "round_robin"):
            raise ValueError(
                f"write_policy must be 'random' or 'round_robin', not {write_policy!r}"
            )
        self.nodes = nodes
        self.write_policy = write_policy
        self.retry_after = retry_after
        self.rng = random.Random(seed)
        self.next_write = 0
        self.cursor: dict[str, int] = {}  # queue -> index of the server reads stick to

    def write_order(self) -> list[Any]:
        """Servers to try for one write: the policy's pick first, then the others in turn; those
        in back-off go last (tried only when every other one refused)."""
        n = len(self.nodes)
        if self.write_policy == "round_robin":
            start = self.next_write % n
            self.next_write += 1
        else:
            start = self.rng.randrange(n)
        ring = [self.nodes[(start + i) % n] for i in range(n)]
        now = time.monotonic()
        ready = [x for x in ring if x.down_until <= now and x.no_writes_until <= now]
        return ready + [x for x in ring if x not in ready]

    def read_order(self, queue: str) -> list[int]:
        """Indexes of the servers to read from, the sticky one first; back-off ones left out."""
        n = len(self.nodes)
        start = self.cursor.get(queue, 0) % n
        now = time.monotonic()
        order = []
        for i in range(n):
            node = self.nodes[(start + i) % n]
            if node.down_until <= now and node.no_reads_until <= now:
                order.append((start + i) % n)
        return order

    def pause_before_retry(self, deadline: float) -> float | None:
        """How long a blocking read that found no server to wait on sleeps before it tries
        again: until the first one leaves back-off, at most until ``deadline``; None once the
        time is up."""
        now = time.monotonic()
        left = deadline - now
        if left < 0.001:
            return None
        back = min(max(n.down_until, n.no_reads_until) for n in self.nodes)
        return max(min(_MIN_PAUSE, left), min(deadline, back) - now)

    def stick(self, queue: str, index: int) -> None:
        self.cursor[queue] = index

    def move_on(self, queue: str, index: int) -> None:
        """``index`` was empty: the next read of ``queue`` starts at the server after it."""
        self.cursor[queue] = (index + 1) % len(self.nodes)

    def mark_down(self, node: _Node) -> None:
        node.down_until = time.monotonic() + self.retry_after

    def mark_no_writes(self, node: _Node) -> None:
        node.no_writes_until = time.monotonic() + self.retry_after

    def mark_no_reads(self, node: _Node) -> None:
        node.no_reads_until = time.monotonic() + self.retry_after


def oldest_check(item: _ItemBase, expected: type) -> deque[_ItemBase] | None:
    """The open-read list ``item`` belongs to, after checking it may be confirmed or aborted now;
    None when the item was lost. Raises ValueError on misuse."""
    if not isinstance(item, expected):
        raise TypeError(f"not an item of this client: {item!r}")
    if item.state == LOST:
        return None
    if item.state != OPEN:
        raise ValueError(f"item already {item.state}")
    items = item._node.open.get(item.queue)
    assert items, "an open item is in its node's open list"
    if items[0] is not item:
        raise ValueError(
            "confirm or abort the oldest open item of a queue on a server first "
            "(the protocol closes the oldest open read)"
        )
    return items


class _ItemBase:
    """A reliable read: data plus the server (and connection) that handed it out."""

    __slots__ = ("queue", "data", "flags", "state", "_node", "_client")

    def __init__(self, queue: str, data: bytes, flags: int, node: _Node, client: Any) -> None:
        self.queue = queue
        self.data = data
        self.flags = flags
        self.state = OPEN  # "open", "confirmed", "aborted" or "lost"
        self._node = node
        self._client = client

    @property
    def server(self) -> Address:
        """The server that handed the item out; only it can confirm or abort it."""
        return self._node.address

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.queue} from {self.server[0]}:{self.server[1]} "
            f"{self.state} {len(self.data)} bytes>"
        )


class Item(_ItemBase):
    """A reliable read of ``Client``: ``confirm()`` removes it, ``abort()`` puts it back."""

    __slots__ = ()

    def confirm(self) -> bool:
        """Confirm on the server that handed it out. False when the outcome is unknown: the
        connection broke (the server puts back a read it still held, which may then be
        delivered again) or no reply came in time (a hung server may yet confirm it)."""
        return self._client.confirm(self)

    def abort(self) -> bool:
        """Put the item back at the head of its server's queue; False when already lost."""
        return self._client.abort(self)


class _Refused(Exception):
    """``SERVER_ERROR``: the server refuses this request now; the connection stays usable."""


def set_request(queue: str, data: bytes, expiry: int, flags: int) -> bytes:
    head = b"set %s %d %d %d\r\n" % (queue.encode("ascii"), flags, expiry, len(data))
    return head + data + b"\r\n"


def set_reply(line: bytes) -> bool | None:
    """True on ``STORED``, False on ``NOT_STORED``, None for anything else (garbage);
    raises ``_Refused`` on ``SERVER_ERROR``."""
    if line == b"STORED":
        return True
    if line == b"NOT_STORED":
        return False
    if line.startswith(b"SERVER_ERROR"):
        raise _Refused(line.decode("ascii", "replace"))
    return None


def value_head(line: bytes, key: str) -> tuple[int, int] | None:
    """``(flags, size)`` of the ``VALUE`` line answering a get of ``key``; ``(-1, -1)`` for
    ``END``; None for anything else (garbage). Raises ``_Refused`` on ``SERVER_ERROR``.
    Kestrel's wire mode names the bare queue, not the key with its options: both answer."""
    if line == b"END":
        return -1, -1
    if line.startswith(b"SERVER_ERROR"):
        raise _Refused(line.decode("ascii", "replace"))
    parts = line.split(b" ")
    raw_key = key.encode("ascii")
    if (
        len(parts) != 4
        or parts[0] != b"VALUE"
        or parts[1] not in (raw_key, raw_key.split(b"/", 1)[0])
        or not (parts[2].isdigit() and parts[3].isdigit())
    ):
        return None
    return int(parts[2]), int(parts[3])


class _Replies:
    """What both clients' connections make of a reply, whatever their I/O. A ``SERVER_ERROR``
    leaves the connection open, as the server does; anything else but a finished exchange
    closes it (its state is unknown), and garbage raises ErqError."""

    node: _Node

    def close(self) -> None:
        raise NotImplementedError

    def _fail(self, request: str, line: bytes) -> ErqError:
        self.close()
        return ErqError(f"{request} on {self.node.address} answered {line[:200]!r}")

    def _stored(self, queue: str, line: bytes) -> bool:
        stored = set_reply(line)
        if stored is None:
            raise self._fail(f"set {queue}", line)
        return stored

    def _head(self, key: str, line: bytes) -> tuple[int, int]:
        head = value_head(line, key)
        if head is None:
            raise self._fail(f"get {key}", line)
        return head

    def _value(
        self, key: str, line: bytes, block: bytes, end: bytes, flags: int
    ) -> tuple[bytes, int]:
        if not block.endswith(b"\r\n") or end != b"END":
            raise self._fail(f"get {key}", line)
        return block[:-2], flags


class _Connection(_Replies):
    """One connection to one server, a request and its reply at a time, on a blocking socket
    (twin of ``erq._client_async._Connection``)."""

    def __init__(self, node: _SyncNode, reliable: bool) -> None:
        self.node = node
        self.reliable = reliable
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.buf = b""
            if self.reliable:
                self.node.lose_open()

    def drop_if_closed(self) -> bool:
        """Close the socket if the server has closed its end (a restart, ``client_timeout``):
        an idle connection is never readable otherwise, and a request sent on a dead one
        would count as the server failing. The next request connects again."""
        if self.sock is not None and peer_closed(self.sock):
            self.close()
            return True
        return False

    def _line(self) -> bytes:
        assert self.sock is not None
        while (end := self.buf.find(b"\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        return line

    def _exactly(self, size: int) -> bytes:
        assert self.sock is not None
        while len(self.buf) < size:
            chunk = self.sock.recv(max(65536, size - len(self.buf)))
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk
        block, self.buf = self.buf[:size], self.buf[size:]
        return block

    def _request(self, data: bytes, wait_s: float) -> bytes:
        """Send ``data``, return the first reply line (without CRLF)."""
        node = self.node
        try:
            if self.sock is None:
                self.sock = socket.create_connection(node.address, node.connect_timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(node.timeout + wait_s)
            self.sock.sendall(data)
            return self._line()
        except BaseException:  # failed, timed out or interrupted: a reply still due must
            self.close()  # not be read as the next request's
            raise

    def set(self, queue: str, data: bytes, expiry: int, flags: int) -> bool:
        """True on ``STORED``, False on ``NOT_STORED``; raises ``_Refused`` on ``SERVER_ERROR``."""
        return self._stored(queue, self._request(set_request(queue, data, expiry, flags), 0.0))

    def get(self, key: str, wait_s: float) -> tuple[bytes, int] | None:
        """A single-key get: ``(data, flags)`` or None; raises ``_Refused`` on ``SERVER_ERROR``."""
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


# A connection that failed or broke (socket timeouts are OSErrors).
_CONNECTION_ERRORS = (OSError, EOFError)

# _fetch outcomes besides a found (data, flags)
_EMPTY = "empty"
_FAILED = "failed"  # connection failure: the node is in back-off
_REFUSED = "refused"  # SERVER_ERROR: the node refuses reads for a while


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


class _ClientCore:
    """What ``Client`` and ``AsyncClient`` do between their requests, written once: server
    choice for reads, the bookkeeping of reliable reads, and what each reply means. Each
    client only does the I/O (blocking or awaited) in between."""

    _item_class: type[_ItemBase]

    def __init__(
        self, nodes: list[Any], write_policy: WritePolicy, retry_after: float, seed: int | None
    ) -> None:
        self._pool = _Pool(nodes, write_policy, retry_after, seed)

    @property
    def servers(self) -> list[Address]:
        return [node.address for node in self._pool.nodes]

    def _read_plan(
        self, queue: str, options: str, deadline: float | None
    ) -> Iterator[tuple[int, Any, str, int]]:
        """The reads of one sticky fetch, as (server index, node, key, wait in ms): every
        readable server once from the sticky one, then (a ``deadline``, monotonic) one
        blocking read on the server the cursor moved to, for the time left. Lazy: each step
        sees where the previous ones left the cursor (``_landed``)."""
        pool = self._pool
        for index in pool.read_order(queue):
            yield index, pool.nodes[index], queue + options, 0
        if deadline is not None:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            order = pool.read_order(queue)
            if order and wait_ms > 0:
                index = order[0]
                yield index, pool.nodes[index], f"{queue}/t={wait_ms}{options}", wait_ms

    def _fetch_steps(
        self, queue: str, options: str, timeout_ms: int | None
    ) -> Generator[tuple[Any, str, int] | float, object, tuple[Any, tuple[bytes, int]] | None]:
        """A sticky read without its I/O, driven by each client's ``_fetch``: it yields
        ``(node, key, wait_ms)`` for a get, to be sent back what ``_fetch_one`` found, or a
        pause in seconds to sleep; it returns the node that had an item and the item, or None.
        With ``timeout_ms`` the rounds of reads (``_read_plan``) go on until a server waited
        out the rest of it or the time is up: while every server is in back-off, it sleeps
        until the first one leaves it."""
        deadline = time.monotonic() + timeout_ms / 1000.0 if timeout_ms else None
        while True:
            waited = False
            for index, node, key, wait_ms in self._read_plan(queue, options, deadline):
                found = yield node, key, wait_ms
                if self._landed(queue, index, found):
                    return node, found
                waited = waited or (wait_ms > 0 and found == _EMPTY)
            if deadline is None or waited:
                return None
            pause = self._pool.pause_before_retry(deadline)
            if pause is None:
                return None
            yield pause

    def _landed(self, queue: str, index: int, found: object) -> bool:
        """After one read of the plan: stick to the server that had an item, else move on."""
        if isinstance(found, tuple):
            self._pool.stick(queue, index)
            return True
        self._pool.move_on(queue, index)
        return False

    def _opened(self, queue: str, node: Any, found: tuple[bytes, int]) -> Any:
        item = self._item_class(queue, found[0], found[1], node, self)
        node.open.setdefault(queue, deque()).append(item)
        return item

    def _chain_close(self, queue: str, confirm: Any) -> Any:
        """``get_reliable(confirm=...)``: check the item and take it off this client's open
        reads (whatever happens now, it is no longer open here); the node to send
        ``q/close/open`` to, or None when the item was lost already."""
        if confirm.queue != queue:
            raise ValueError("confirm= must be an item of the same queue")
        items = oldest_check(confirm, self._item_class)
        if items is None:
            return None
        items.popleft()
        confirm.state = LOST  # until the server answered
        return confirm._node

    def _chained(self, queue: str, confirm: Any, node: Any, found: object) -> Any:
        """The reply to ``q/close/open``: the confirmed item's state, and the next item of that
        server (or None: then the caller reads as a plain ``get_reliable``). Under QUIESCENT
        the close still happens before the fetch is refused (PROTOCOL §10)."""
        confirm.state = LOST if found == _FAILED else CONFIRMED
        if isinstance(found, tuple):
            self._pool.stick(queue, self._pool.nodes.index(node))
            return self._opened(queue, node, found)
        return None

    def _finished(self, item: Any, items: deque, option: str, state: str, found: object) -> bool:
        """The reply to ``q/close`` or ``q/abort``. A broken connection (the node forgot the
        item: LOST) or a refusal (cannot happen: close and abort always work; if it did, the
        item is still open on a live connection) is False."""
        if found in (_FAILED, _REFUSED):
            return False
        if found != _EMPTY:
            raise ErqError(f"get {item.queue}{option} on {item.server} answered {found!r}")
        items.popleft()
        item.state = state
        return True


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
        """``timeout`` bounds each reply (a blocking read adds its own wait to it);
        ``retry_after`` is how long a server that failed or refused is skipped; ``seed`` makes
        the random write policy repeatable."""
        nodes = [_SyncNode(parse_server(s), connect_timeout, timeout) for s in server_list(servers)]
        super().__init__(nodes, write_policy, retry_after, seed)

    # ---- writes ---------------------------------------------------------------------------
    def put(self, queue: str, data: bytes, *, expiry: int = 0, flags: int = 0) -> bool:
        """Enqueue on one server (per the write policy), moving on to the next while servers
        fail or refuse (READONLY, full queue). True only after a ``STORED``; False when every
        server failed or refused. A write whose reply was lost may have been stored there and
        is tried elsewhere too: delivery is at least once."""
        check_queue_name(queue)
        data = bytes(data)  # a bytearray or memoryview too; str raises TypeError
        pool = self._pool
        for node in pool.write_order():
            node.plain.drop_if_closed()
            try:
                stored = node.plain.set(queue, data, int(expiry), int(flags))
            except _CONNECTION_ERRORS:
                pool.mark_down(node)
                continue
            except _Refused as exc:  # read only, too large, journal error
                if status_refusal(exc):
                    pool.mark_no_writes(node)
                continue
            if stored:
                return True
            # NOT_STORED: this server's queue is full or its item limit is lower; try another.
        return False

    # ---- reads ----------------------------------------------------------------------------
    def get(self, queue: str, *, timeout_ms: int | None = None) -> bytes | None:
        """Dequeue, sticking to one server until it is empty, then moving to the next.

        Without ``timeout_ms``: None once every reachable server was found empty. With it: when
        every server is empty, one blocking read (``/t=``) on the next server in turn, so the
        call returns within about ``timeout_ms`` plus one round trip per server.
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
        if confirm is not None:
            node = self._chain_close(queue, confirm)
            if node is not None:
                found = self._fetch_one(node, queue + "/close/open", 0, True, acts=True)
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
        items = oldest_check(item, Item)
        if items is None:
            return False
        found = self._fetch_one(item._node, item.queue + option, 0, True, acts=True)
        return self._finished(item, items, option, state, found)

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
            if status_refusal(exc):
                self._pool.mark_no_reads(node)
            return _REFUSED
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
