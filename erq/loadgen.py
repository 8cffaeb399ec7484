"""The load generator behind ``erq bench``: a memcache-protocol client that really pipelines and
checks every reply, in one thread with non-blocking sockets and ``selectors``.

Each connection writes a batch of ``pipeline`` requests, then reads exactly as many replies,
parsed incrementally as they arrive (``VALUE`` blocks by their byte count). A load (set, get,
pingpong) decides what each batch holds and checks each reply: a ``get`` must return a value the
bench put, in FIFO order, once. A wrong value, an error reply, a lost connection or a server
silent for ``timeout`` raises BenchError.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Protocol

MAX_LINE = 65536  # a reply line longer than this is garbage, not a line still arriving

Value = tuple[bytes, int, bytes]  # key, flags, data of one VALUE block
Reply = tuple[bytes, list[Value]]  # final line without CRLF, VALUE blocks before it


class BenchError(Exception):
    """The run failed: wrong value, error reply, lost connection, timeout, server trouble."""


# ---- values ------------------------------------------------------------------------------------
class Values:
    """The value the bench puts for counter ``i``: ``b"<i>:"`` padded with dots to ``size`` bytes
    (cut to ``size`` when the tag does not fit), so a received value names its own counter."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pad = b"." * size

    @property
    def capacity(self) -> int:
        """How many counters have a whole tag at this size (values beyond cannot be checked)."""
        return 10 ** (self.size - 1) if self.size >= 2 else 0

    def make(self, i: int) -> bytes:
        tag = b"%d:" % i
        if len(tag) >= self.size:
            return tag[: self.size]
        return tag + self._pad[: self.size - len(tag)]

    def counter(self, data: bytes) -> int:
        """The counter ``data`` was made from; BenchError if it is not one of the bench's values."""
        colon = data.find(b":")
        digits = data[:colon]
        if colon < 1 or not digits.isdigit() or self.make(int(digits)) != data:
            raise BenchError(f"wrong value: {_show(data)} is not a value the bench put")
        return int(digits)


def _show(data: bytes, limit: int = 60) -> str:
    text = repr(data[:limit])
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


# ---- replies -----------------------------------------------------------------------------------
class ReplyReader:
    """Splits a memcache reply stream into whole replies however it was chunked: ``VALUE`` blocks
    are read by their byte count (data may hold CR/LF), and the line after them ends the reply."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = -1  # data bytes of the VALUE block being read, -1 when reading a line
        self._key = b""
        self._flags = 0
        self._values: list[Value] = []

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; return the replies they completed, in order."""
        buf = self._buf
        buf += data
        out: list[Reply] = []
        pos = 0
        end = len(buf)
        while True:
            if self._need >= 0:
                stop = pos + self._need
                if stop + 2 > end:
                    break
                if buf[stop : stop + 2] != b"\r\n":
                    raise BenchError(
                        f"protocol error: {self._need}-byte value not followed by CRLF: "
                        f"{_show(bytes(buf[pos : stop + 2]))}"
                    )
                self._values.append((self._key, self._flags, bytes(buf[pos:stop])))
                pos = stop + 2
                self._need = -1
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_LINE:
                    raise BenchError(f"protocol error: no CRLF in {_show(bytes(buf[pos:]))}")
                break
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if line.startswith(b"VALUE "):
                self._value_line(line)
                continue
            out.append((line, self._values))
            self._values = []
        del buf[:pos]
        return out

    @property
    def partial(self) -> bool:
        """True when bytes were received that are not yet part of a whole reply."""
        return bool(self._buf or self._values or self._need >= 0)

    def _value_line(self, line: bytes) -> None:
        parts = line.split()
        try:
            if len(parts) not in (4, 5):
                raise ValueError
            flags, size = int(parts[2]), int(parts[3])
            if flags < 0 or size < 0:
                raise ValueError
        except ValueError:
            raise BenchError(f"protocol error: bad VALUE line {_show(line)}") from None
        self._key, self._flags, self._need = parts[1], flags, size


def _unexpected(what: str, line: bytes, values: list[Value]) -> BenchError:
    if line.startswith((b"SERVER_ERROR", b"CLIENT_ERROR")) or line == b"ERROR":
        kind = "error reply"
    else:
        kind = "unexpected reply"
    shown = _show(line) + (f" after {len(values)} VALUE block(s)" if values else "")
    return BenchError(f"{kind} to {what}: {shown}")


# ---- loads -------------------------------------------------------------------------------------
class Load(Protocol):
    """What one scenario sends on each connection and how it checks the replies."""

    def next_batch(self, conn: int, late: bool) -> tuple[bytes, int] | None:
        """The next requests and how many replies they get; None when ``conn`` is done.
        ``late``: the run's time is up (only a load that must finish something goes on)."""
        ...

    def check(self, conn: int, line: bytes, values: list[Value]) -> None:
        """Check one reply; raise BenchError when it is wrong."""
        ...


class SetLoad:
    """Pipelined sets of counter-tagged values, up to ``limit`` of them when given."""

    def __init__(
        self, queue: bytes, values: Values, pipeline: int, limit: int | None = None
    ) -> None:
        self.values = values
        self.pipeline = pipeline
        self.limit = limit
        self.header = b"set %s 0 0 %d\r\n" % (queue, values.size)
        self.issued = 0
        self.stored = 0

    def next_batch(self, conn: int, late: bool) -> tuple[bytes, int] | None:
        n = self.pipeline if self.limit is None else min(self.pipeline, self.limit - self.issued)
        if late or n <= 0:
            return None
        first = self.issued
        self.issued += n
        make, header = self.values.make, self.header
        return b"".join([header + make(i) + b"\r\n" for i in range(first, first + n)]), n

    def check(self, conn: int, line: bytes, values: list[Value]) -> None:
        if line != b"STORED" or values:
            raise _unexpected("set", line, values)
        self.stored += 1


class GetLoad:
    """Pipelined gets draining a queue of ``filled`` values put in counter order by one
    connection: each value must be the bench's, arrive once, and in increasing order on its
    connection (FIFO). The first empty reply means the queue is drained: everything stops."""

    def __init__(self, queue: bytes, values: Values, pipeline: int, conns: int, filled: int):
        self.queue = queue
        self.values = values
        self.batch = b"get %s\r\n" % queue * pipeline
        self.pipeline = pipeline
        self.filled = filled
        self.seen = bytearray(filled)
        self.last = [-1] * conns
        self.items = 0
        self.empty = 0
        self.drained = False

    def next_batch(self, conn: int, late: bool) -> tuple[bytes, int] | None:
        if late or self.drained:
            return None
        return self.batch, self.pipeline

    def check(self, conn: int, line: bytes, values: list[Value]) -> None:
        if line != b"END" or len(values) > 1:
            raise _unexpected("get", line, values)
        if not values:
            self.empty += 1
            self.drained = True
            return
        key, flags, data = values[0]
        if key != self.queue or flags != 0:
            raise BenchError(
                f"wrong reply to get {self.queue.decode()}: VALUE {_show(key)} flags {flags}"
            )
        i = self.values.counter(data)
        if i >= self.filled:
            raise BenchError(f"wrong value: counter {i}, but the bench put only {self.filled}")
        if self.seen[i]:
            raise BenchError(f"value {i} was returned twice (is this a queue server?)")
        if i < self.last[conn]:
            raise BenchError(f"out of order: value {i} after {self.last[conn]} on one connection")
        self.seen[i] = 1
        self.last[conn] = i
        self.items += 1


class PingPongLoad:
    """One request at a time: set value i, then get must return exactly value i."""

    def __init__(self, queue: bytes, values: Values) -> None:
        self.queue = queue
        self.values = values
        self.header = b"set %s 0 0 %d\r\n" % (queue, values.size)
        self.get = b"get %s\r\n" % queue
        self.next = 0
        self.waiting: int | None = None  # counter set and not yet got back
        self.sets = 0
        self.gets = 0

    def next_batch(self, conn: int, late: bool) -> tuple[bytes, int] | None:
        if self.waiting is not None:
            return self.get, 1  # finish the pair even when late: nothing left behind
        if late:
            return None
        return self.header + self.values.make(self.next) + b"\r\n", 1

    def check(self, conn: int, line: bytes, values: list[Value]) -> None:
        if self.waiting is None:
            if line != b"STORED" or values:
                raise _unexpected("set", line, values)
            self.waiting = self.next
            self.next += 1
            self.sets += 1
            return
        if line == b"END" and not values:
            raise BenchError(
                f"lost item: get returned nothing right after value {self.waiting} was STORED"
            )
        if line != b"END" or len(values) != 1:
            raise _unexpected("get", line, values)
        expected = (self.queue, 0, self.values.make(self.waiting))
        if values[0] != expected:
            key, flags, data = values[0]
            raise BenchError(
                f"wrong value: get returned VALUE {_show(key)} {flags} {_show(data)}, "
                f"the bench had just put {_show(expected[2])}"
            )
        self.waiting = None
        self.gets += 1


# ---- the driver --------------------------------------------------------------------------------
@dataclass
class Timing:
    elapsed: float  # from the first write to the last reply
    latencies: list[float]  # seconds, one per batch
    client_cpu: float  # this process's user+system seconds


class _Conn:
    __slots__ = ("index", "sock", "reader", "out", "waiting", "sent_at", "writing")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.reader = ReplyReader()
        self.out = memoryview(b"")
        self.waiting = 0
        self.sent_at = 0.0
        self.writing = False


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A blocking connection with ``timeout`` on every call; BenchError when refused."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise BenchError(f"cannot connect to {host}:{port}: {exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drive(load: Load, host: str, port: int, conns: int, seconds: float, timeout: float) -> Timing:
    """Run ``load`` on ``conns`` connections until it is done or ``seconds`` have passed (then
    the batches in flight finish). Fails when no byte moves for ``timeout`` seconds."""
    socks = [connect(host, port, timeout) for _ in range(conns)]
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    cpu0 = sum(os.times()[:2])
    try:
        conns_ = [_Conn(i, s) for i, s in enumerate(socks)]
        for c in conns_:
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
        start = last = time.perf_counter()
        deadline = start + seconds
        active = 0
        for c in conns_:
            active += _next_batch(load, c, sel, start >= deadline, start)
        while active:
            events = sel.select(timeout)
            if not events:
                waiting = sum(c.waiting for c in conns_)
                raise BenchError(
                    f"no reply from {host}:{port} within {timeout:g} s "
                    f"({waiting} replies outstanding)"
                )
            for key, mask in events:
                c = key.data
                if mask & selectors.EVENT_WRITE:
                    _flush(c, sel)
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    data = c.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise BenchError(f"lost the connection to {host}:{port}: {exc}") from None
                if not data:
                    raise BenchError(
                        f"{host}:{port} closed the connection with {c.waiting} replies outstanding"
                    )
                replies = c.reader.feed(data)
                if len(replies) > c.waiting:
                    line = replies[c.waiting][0]
                    raise BenchError(f"unexpected reply nothing was asked for: {_show(line)}")
                for line, values in replies:
                    load.check(c.index, line, values)
                c.waiting -= len(replies)
                if replies and not c.waiting:
                    last = time.perf_counter()
                    latencies.append(last - c.sent_at)
                    if not _next_batch(load, c, sel, last >= deadline, last):
                        active -= 1
        for c in conns_:
            if c.reader.partial:
                raise BenchError(f"{host}:{port} sent bytes that answer nothing: a partial reply")
        return Timing(last - start, latencies, sum(os.times()[:2]) - cpu0)
    finally:
        sel.close()
        for s in socks:
            s.close()


def _next_batch(load: Load, c: _Conn, sel: selectors.BaseSelector, late: bool, now: float) -> int:
    """Start ``c``'s next batch; 1 if it started, 0 if the connection is done."""
    batch = load.next_batch(c.index, late)
    if batch is None:
        return 0
    c.out, c.waiting = memoryview(batch[0]), batch[1]
    c.sent_at = now
    _flush(c, sel)
    return 1


def _flush(c: _Conn, sel: selectors.BaseSelector) -> None:
    try:
        while c.out:
            c.out = c.out[c.sock.send(c.out) :]
    except (BlockingIOError, InterruptedError):
        pass
    except OSError as exc:
        raise BenchError(f"lost the connection while writing: {exc}") from None
    if bool(c.out) != c.writing:
        c.writing = bool(c.out)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0)
        sel.modify(c.sock, events, c)


# ---- one-off commands --------------------------------------------------------------------------
def command(host: str, port: int, request: bytes, timeout: float) -> Reply:
    """Send one request on a fresh connection and return its whole reply."""
    with connect(host, port, timeout) as sock:
        sock.sendall(request)
        reader = ReplyReader()
        while True:
            data = _recv(sock, host, port, timeout)
            if not data:
                raise BenchError(f"{host}:{port} closed the connection after {request!r}")
            replies = reader.feed(data)
            if replies:
                return replies[0]


def _recv(sock: socket.socket, host: str, port: int, timeout: float) -> bytes:
    try:
        return sock.recv(65536)
    except TimeoutError:
        raise BenchError(f"no reply from {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise BenchError(f"lost the connection to {host}:{port}: {exc}") from None


def read_stats(host: str, port: int, timeout: float) -> dict[str, str]:
    """``stats`` as a dict (memcached's framing: STAT lines, then END)."""
    with connect(host, port, timeout) as sock:
        sock.sendall(b"stats\r\n")
        buf = b""
        while not (buf.startswith(b"END\r\n") or buf.endswith(b"\r\nEND\r\n")):
            chunk = _recv(sock, host, port, timeout)
            if not chunk:
                raise BenchError(f"{host}:{port} closed the connection during stats")
            buf += chunk
    stats = {}
    for line in buf.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


def delete_queue(host: str, port: int, queue: bytes, timeout: float) -> None:
    """Drop the bench's queue (memcached answers NOT_FOUND for a missing key: also fine)."""
    line, values = command(host, port, b"delete %s\r\n" % queue, timeout)
    if line not in (b"DELETED", b"NOT_FOUND") or values:
        raise _unexpected(f"delete {queue.decode()}", line, values)
