"""What ``Client`` (``erq.client``) and ``AsyncClient`` (``erq._client_async``) share, written
once: the server list and its back-off, reliable reads and their states, the requests and what
each reply means, and the choice of server for each read. The two clients add only the I/O,
blocking or awaited; their behaviour is described in ``erq.client``.
"""

from __future__ import annotations

import ipaddress
import math
import operator
import random
import select
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from erq.names import valid_queue_name

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
    a server still starting, one at its ``max_connections``): skip that server for
    ``retry_after``. Others (item too large, journal error) concern one request only."""
    text = str(error)
    return any(
        word in text for word in ("read only", "quiescent", "starting", "too many open connections")
    )


def parse_server(spec: ServerSpec) -> Address:
    """``"host:port"``, ``"host"`` (port 22133), ``"[v6]:port"``, a bare IPv6 address or
    ``(host, port)`` -> ``(host, port)``. ValueError for a port outside 1-65535 (the resolver
    would take 99999 for 34463) and for a server no address can name (an empty host, a space,
    colons that make no IPv6 address: ``"::1:22133"`` is not ``"[::1]:22133"``): such a
    server would be taken for down on every request, and nothing would say why. TypeError for
    a server that is neither a str nor a tuple (``Client(["host", 22133])`` means one server)."""
    host, port = _split_server(spec)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in server {spec!r}")
    if not _possible_host(host):
        raise ValueError(f"bad host in server {spec!r}")
    return host, port


def _split_server(spec: ServerSpec) -> Address:
    if isinstance(spec, tuple):
        host, port = spec
        return str(host), _port(port, spec)
    if not isinstance(spec, str):
        raise TypeError(f"server {spec!r} is neither 'host:port' nor (host, port)")
    if spec.startswith("["):  # "[::1]:22133" or "[::1]"
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise ValueError(f"bad server {spec!r}")
        return host, _port(rest[1:], spec) if rest else DEFAULT_PORT
    if spec.count(":") > 1:  # a bare IPv6 address: its colons are not a port
        return spec, DEFAULT_PORT
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, DEFAULT_PORT
    return host, _port(port, spec)


def _port(port: Any, spec: ServerSpec) -> int:
    """A port given as an int or as its digits (``int()`` took 22133.9 for 22133)."""
    if isinstance(port, str):
        if port.isascii() and port.isdigit():
            return int(port)
    elif not isinstance(port, bool):
        try:
            return operator.index(port)
        except TypeError:
            pass
    raise ValueError(f"bad port in server {spec!r}")


def _possible_host(host: str) -> bool:
    """A name or an address a server can have; one with colons is an IPv6 address."""
    if not host or not host.isprintable() or " " in host:
        return False
    if ":" not in host:
        return True
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


_MAX_WAIT_MS = (1 << 31) - 1  # Kestrel's t= is a 32-bit int


def check_timeout_ms(timeout_ms: Any) -> None:
    """A read's ``timeout_ms``: None (no wait) or 0 to 2**31 - 1 ms, checked before any
    request. An infinite, NaN or huge one raised after a first round of reads (on Client
    by closing the connection, which lost the reliable reads it held) or, huge on
    AsyncClient, waited for ever; a negative one is no wait to some, for ever to others."""
    if timeout_ms is None:
        return
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float):
        raise TypeError(f"timeout_ms is a number of milliseconds, not {type(timeout_ms).__name__}")
    if not 0 <= timeout_ms <= _MAX_WAIT_MS:  # NaN too
        raise ValueError(f"timeout_ms must be from 0 to 2**31 - 1, not {timeout_ms!r}")


def check_durations(connect_timeout: float, timeout: float, retry_after: float) -> None:
    """A client's durations in seconds, checked when it is made: a timeout of 0 made each
    socket non-blocking (every server taken for down, every call False or None), a negative
    or NaN one failed in the middle of a request on one client and not on the other."""
    _seconds("connect_timeout", connect_timeout, "above")
    _seconds("timeout", timeout, "above")
    _seconds("retry_after", retry_after, "at least")


def _seconds(name: str, value: Any, bound: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} is a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 if bound == "above" else value >= 0)):
        raise ValueError(f"{name} must be a finite number of seconds {bound} 0, not {value!r}")


def server_text(address: Address) -> str:
    """``host:port``, an IPv6 host in brackets (``[::1]:22133``): ``::1:22133`` could be
    host ``::1`` port 22133 or host ``::1:22133`` on the default port."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_list(servers: Sequence[ServerSpec] | ServerSpec) -> list[ServerSpec]:
    """One server given alone (``"host:port"`` or ``(host, port)``, the port an int or its
    digits, as ``parse_server`` takes it) or a sequence of them."""
    if isinstance(servers, str) or (
        isinstance(servers, tuple)
        and len(servers) == 2
        and (isinstance(servers[1], int) or (isinstance(servers[1], str) and servers[1].isdigit()))
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
    if not isinstance(queue, str):
        raise TypeError(f"a queue name is a str, not {type(queue).__name__}")
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

    def drop_oldest(self, queue: str) -> None:
        """The oldest open read of ``queue`` here is confirmed, aborted or on its way: off the
        list, and an emptied list off ``open`` (a client reading a new queue for each request,
        a reply queue, kept one for every queue it ever read)."""
        items = self.open[queue]
        items.popleft()
        if not items:
            del self.open[queue]

    def lose_open(self) -> None:
        """The reliable connection broke: the server put its open reads back; forget them."""
        for items in self.open.values():
            for item in items:
                item.state = LOST
        self.open.clear()


_CURSORS_KEPT = 1024  # queues whose sticky server a client remembers (_Pool._point)
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
        self._point(queue, index)

    def move_on(self, queue: str, index: int) -> None:
        """``index`` was empty: the next read of ``queue`` starts at the server after it."""
        self._point(queue, (index + 1) % len(self.nodes))

    def _point(self, queue: str, index: int) -> None:
        """Where the next read of ``queue`` starts. Only the ``_CURSORS_KEPT`` queues read
        last are remembered (a client reading a new queue for each request, a reply queue,
        kept one for every queue it ever read); a forgotten one starts at the first server."""
        cursor = self.cursor
        cursor.pop(queue, None)  # back in as the most recent
        if len(cursor) >= _CURSORS_KEPT:
            del cursor[next(iter(cursor))]
        cursor[queue] = index

    def reached(self, node: _Node) -> None:
        """``node`` answered: it is no longer unreachable (its refusals' back-offs stay)."""
        node.down_until = 0.0

    def mark_down(self, node: _Node) -> None:
        node.down_until = time.monotonic() + self.retry_after

    def mark_no_writes(self, node: _Node) -> None:
        node.no_writes_until = time.monotonic() + self.retry_after

    def mark_no_reads(self, node: _Node) -> None:
        node.no_reads_until = time.monotonic() + self.retry_after


def oldest_check(item: _ItemBase, client: Any) -> deque[_ItemBase] | None:
    """The open-read list ``item`` belongs to, after checking it may be confirmed or aborted now
    by ``client``; None when the item was lost. Raises TypeError for anything but an item of
    ``client`` (another client's is held on that client's connection, which this one neither
    uses nor tracks), ValueError on misuse."""
    if not isinstance(item, client._item_class) or item._holder() is not client:
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
    """A reliable read: data plus the server (and connection) that handed it out.

    A pickle (or a copy) carries the queue, data, flags, state (as it was) and server, not the
    read itself: that stays open on the connection of the client that got it, which cannot
    travel. A copy's ``confirm()`` and ``abort()`` raise TypeError: the original does them, in
    the process that read it."""

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

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        fields = (self.queue, self.data, self.flags, self.state, self.server)
        return _copy_of_item, (type(self), *fields)

    def _holder(self) -> Any:
        """The client holding the read open; TypeError for a copy, which none holds."""
        if self._client is None:
            raise TypeError(
                f"{self!r} is a copy (pickled or copied): only the original item, in the "
                "process that read it, can confirm or abort the read"
            )
        return self._client

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.queue} from {server_text(self.server)} "
            f"{self.state} {len(self.data)} bytes>"
        )


def _copy_of_item(
    cls: type[_ItemBase], queue: str, data: bytes, flags: int, state: str, server: Address
) -> _ItemBase:
    """What a pickled or copied item becomes: its fields and server, held by no client."""
    item = cls(queue, data, flags, _Node(server), None)
    item.state = state
    return item


class Item(_ItemBase):
    """A reliable read of ``Client``: ``confirm()`` removes it, ``abort()`` puts it back."""

    __slots__ = ()

    def confirm(self) -> bool:
        """Confirm on the server that handed it out. False when the outcome is unknown: the
        connection broke (the server puts back a read it still held, which may then be
        delivered again) or no reply came in time (a hung server may yet confirm it). True
        too for a read the server's ``open_timeout`` had already put back, which the server
        does not tell apart in its answer: that item comes again."""
        return self._holder().confirm(self)

    def abort(self) -> bool:
        """Put the item back at the head of its server's queue; False when already lost."""
        return self._holder().abort(self)


class _Refused(Exception):
    """``SERVER_ERROR``: the server refuses this request now; the connection stays usable."""


def payload(data: Any) -> bytes:
    """An item's bytes from any bytes-like object; TypeError for anything else (``bytes()``
    would make an int that many NUL bytes, and a str has no bytes before an encoding)."""
    if type(data) is bytes:
        return data
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise TypeError(
            f"an item's data is bytes-like (bytes, bytearray, memoryview), not {type(data).__name__}"
        ) from None


_MAX_EXPIRY = (1 << 63) - 1  # the protocol's largest exptime (a signed 64-bit integer)
_MAX_FLAGS = (1 << 32) - 1


def expiry_seconds(expiry: Any) -> int:
    """``put``'s ``expiry`` as the exptime sent (PROTOCOL §6: 0 never, up to 30 days relative
    seconds, larger an absolute Unix time). A float rounds up, so that a fraction of a second
    never becomes 0 (never). Negative is refused: the server would answer STORED for an item
    already expired, gone before any read. A bool is no number of seconds."""
    if isinstance(expiry, float):
        seconds = math.ceil(expiry) if math.isfinite(expiry) and expiry >= 0 else -1
    else:
        seconds = _whole_number("expiry", expiry, "an int or a float")
    if not 0 <= seconds <= _MAX_EXPIRY:
        raise ValueError(f"expiry must be from 0 (never) to 2**63 - 1 seconds, not {expiry!r}")
    return seconds


def item_flags(flags: Any) -> int:
    """``put``'s ``flags`` as sent: the protocol's unsigned 32-bit number, kept with the item."""
    value = _whole_number("flags", flags, "an int")
    if not 0 <= value <= _MAX_FLAGS:
        raise ValueError(f"flags must be from 0 to 2**32 - 1, not {flags!r}")
    return value


def _whole_number(name: str, value: Any, kinds: str) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} is {kinds}, not {type(value).__name__}")


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


# The longest reply line either client reads, far beyond any the server sends it (a VALUE line
# of a 250-byte name and its options, a SERVER_ERROR): a server that sends a line without end
# is answered ErqError, not with memory until it stops.
MAX_REPLY_LINE = 1 << 16


class ConnectionBusy(RuntimeError):
    """A request refused before a byte of it was sent: another thread's or task's request is
    under way on that connection."""


class _Replies:
    """What both clients' connections make of a reply, whatever their I/O. A ``SERVER_ERROR``
    leaves the connection open, as the server does; anything else but a finished exchange
    closes it (its state is unknown), and garbage raises ErqError."""

    node: _Node
    _busy: threading.Lock  # held from a request's first byte sent to its reply's last read

    def close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def _alone(self) -> Iterator[None]:
        """One request at a time on a connection: another thread's or task's request gets
        RuntimeError before it sends a byte (it would have read the reply to the first, and the
        first its reply: items taken and stored with no caller told)."""
        if not self._busy.acquire(blocking=False):
            raise ConnectionBusy(
                f"a request to {server_text(self.node.address)} is under way from another "
                "thread or task: a client serves one at a time, give each its own"
            )
        try:
            yield
        finally:
            self._busy.release()

    def _fail(self, request: str, line: bytes) -> ErqError:
        self.close()
        return ErqError(f"{request} on {self.node.address} answered {line[:200]!r}")

    def _line_too_long(self) -> ErqError:
        self.close()
        return ErqError(f"{self.node.address} answered a line longer than {MAX_REPLY_LINE} bytes")

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


# A connection that failed or broke (socket timeouts are OSErrors).
_CONNECTION_ERRORS = (OSError, EOFError)

# _fetch outcomes besides a found (data, flags)
_EMPTY = "empty"
_FAILED = "failed"  # connection failure: the node is in back-off
_REFUSED = "refused"  # SERVER_ERROR: the node refuses reads for a while


def lose_reads(conn: Any) -> str:
    """A close its server refused for a reason other than its status (a confirm it could not
    journal: disk full): whether it took effect is unknown, as ``q/close/open``'s close may
    have and its fetch not. Closing the reliable connection settles it: the server puts back
    every read still open there, and this client's items on it are lost (delivered again,
    at least once), which is what ``_FAILED`` means for them."""
    conn.close()
    return _FAILED


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
        check_timeout_ms(timeout_ms)
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
        items = oldest_check(confirm, self)  # before any use of it: it may be no item at all
        if confirm.queue != queue:
            raise ValueError("confirm= must be an item of the same queue")
        if items is None:
            return None
        confirm._node.drop_oldest(queue)
        confirm.state = LOST  # until the server answered
        return confirm._node

    def _unchain(self, queue: str, confirm: Any, node: Any) -> None:
        """Undo ``_chain_close`` for a ``q/close/open`` refused before it was sent
        (ConnectionBusy): the item is open here again, the oldest of its queue."""
        node.open.setdefault(queue, deque()).appendleft(confirm)
        confirm.state = OPEN

    def _chained(self, queue: str, confirm: Any, node: Any, found: object) -> Any:
        """The reply to ``q/close/open``: the confirmed item's state, and the next item of that
        server (or None: then the caller reads as a plain ``get_reliable``). Under QUIESCENT
        the close still happens before the fetch is refused (PROTOCOL §10)."""
        confirm.state = LOST if found == _FAILED else CONFIRMED
        if isinstance(found, tuple):
            self._pool.stick(queue, self._pool.nodes.index(node))
            return self._opened(queue, node, found)
        return None

    def _finished(self, item: Any, option: str, state: str, found: object) -> bool:
        """The reply to ``q/close`` or ``q/abort``. A broken connection, or a close its server
        could not journal (the connection is closed then: ``lose_reads``), is False, the item
        LOST; a refusal for the server's status (cannot happen: close and abort work under
        any status; if it did, the item is still open on a live connection) is False too."""
        if found in (_FAILED, _REFUSED):
            return False
        if found != _EMPTY:
            raise ErqError(f"get {item.queue}{option} on {item.server} answered {found!r}")
        item._node.drop_oldest(item.queue)
        item.state = state
        return True
