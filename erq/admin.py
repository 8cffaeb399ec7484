"""The admin HTTP port (Kestrel's 2223): liveness, readiness, stats as JSON, Prometheus metrics.

Orchestrators and scrapers speak HTTP, not memcache. This is a deliberately small HTTP/1.1
server on asyncio streams -- GET and HEAD, one request per connection -- so that it needs no
dependency, and a client that misbehaves holds at most one bounded buffer for a bounded time.
It reads the server's state and never changes it. Every number comes from the functions behind
the memcache ``stats`` command (``general_stats``, ``QueueCollection.queue_stats``), so the two
views cannot disagree and a new stats field appears here without a change to this file.

The port opens before recovery and answers during it (the journals are replayed on a worker
thread): /healthz says ok, every other endpoint 503 ``starting`` until the queues are loaded.

With thousands of queues a stats document is megabytes of text: its per-queue numbers are
gathered and its text made on the loop a slice of time at a time (the loop serves its sockets
in between; a worker thread would take the GIL from the loop in 5 ms turns), and it goes out
to each client a piece a loop pass into a small kernel send buffer, so that a scrape, or a
flood of scrapes that nobody reads, does not hold every client back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .server_commands import GENERAL_COUNTERS, general_stats
from .sliced import each_queue_stats, in_slices
from .state import STATUSES

log = logging.getLogger("erq.admin")

MAX_HEAD = 8192  # bytes of request line and headers; a longer head gets 431 and a close
TIMEOUT = 10.0  # seconds to send a whole request head, and again to take the whole reply
LINGER = 2.0  # seconds to drain a client still sending when it was answered (a body, a head)
# Open at once (probes and scrapers need few). One more takes the place of the connection that
# has waited longest on its client, for its request head or to take its answer, or if none
# does, of the one whose answer has been in the making longest: a probe sends its head and
# reads at once, so 64 idle clients, clients that asked for a large document and do not read
# it, or 64 asking for documents at once cannot lock the probes out (an orchestrator would
# restart a healthy server).
MAX_CONNECTIONS = 64
# An answer goes out SEND_PIECE bytes a loop pass, into a kernel send buffer of SEND_BUFFER
# (which Linux doubles) rather than one autotuned up to megabytes. Written whole, a 3 MB
# /metrics went into each connection's socket at once, whether its client read or not, 0.5-12
# ms a write, and the clients waiting for the same document all got it in one pass: clients
# flooding /metrics of 4,000 queues and reading nothing held memcache clients up to 0.2-1 s.
SEND_PIECE = 64 * 1024
SEND_BUFFER = 256 * 1024

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_METHODS = ("GET", "HEAD")
# RFC 9112 request-line: a method token, an origin-form (or any visible) target, a version.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/(\d)\.\d")

# (status, content type, body) of one answer, before HEAD drops the body.
Reply = tuple[int, str, bytes]
# Before recovery has finished: numbers of queues not loaded yet would say "empty", wrongly.
STARTING: Reply = (503, TEXT, b"starting")


# ---- endpoints -----------------------------------------------------------------------------
def healthz(state: Any) -> Reply:
    """Liveness: the process runs its loop and answers (during recovery too)."""
    return 200, TEXT, b"ok"


def readyz(state: Any) -> Reply:
    """Readiness: recovery is over and the status lets clients read (UP or READONLY)."""
    if not state.ready:
        return STARTING
    if state.status == "QUIESCENT":
        return 503, TEXT, b"QUIESCENT"
    return 200, TEXT, state.status.encode("ascii")


async def every_queue_stats(state: Any) -> dict[str, dict[str, Any]]:
    """``queue_stats`` of every queue, gathered a slice of time at a time (erq.sliced), the
    loop serving its sockets in between (a queue deleted meanwhile is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in each_queue_stats(state.queues):
        if entry is None:
            await asyncio.sleep(0)
        else:
            out[entry[0]] = entry[1]
    return out


async def every_queue_json(state: Any) -> str:
    """The JSON object of every queue's ``queue_stats``, each queue made text as its numbers
    are gathered, within their slice of time. One json.dumps of the whole, even on a worker
    thread, holds the GIL and so the loop all along (~15 ms for 4,000 queues, ~250 ms for
    40,000); a queue at a time costs the same in all."""
    parts: list[str] = []
    for entry in each_queue_stats(state.queues):
        if entry is None:
            await asyncio.sleep(0)
        else:
            parts.append(f"{json.dumps(entry[0])}: {json.dumps(entry[1])}")
    return "{" + ", ".join(parts) + "}"


async def stats_json(state: Any) -> Reply:
    """The memcache ``stats`` reply as one object: the general fields, then ``queues``."""
    if not state.ready:
        return STARTING
    general = json.dumps(dict(general_stats(state)))
    queues = await every_queue_json(state)
    return 200, JSON, f'{general[:-1]}, "queues": {queues}}}'.encode()


# How the numeric stats fields are exported. The fields themselves come from ``general_stats``
# and ``queue_stats``; these tables only add what Prometheus needs: which fields are counters
# (exported as ``<field>_total``, a leading ``total_`` dropped; the general ones are
# ``GENERAL_COUNTERS``, those ``stats reset`` zeroes), unit suffixes, and help text.
# A numeric field missing from them is still exported, as a gauge with a generic help line.
_QUEUE_COUNTERS = frozenset(
    {
        "total_items",
        "expired_items",
        "discarded",
        "transactions",
        "canceled_transactions",
        "total_flushes",
        "journal_rewrites",
        "journal_rotations",
        "journal_sync_errors",
    }
)
_UNITS = {"uptime": "uptime_seconds", "age": "age_milliseconds"}
# Counters whose plain name would clash with a gauge's: OpenMetrics names a counter's family
# without its _total, so erq_queue_items_total would be a second erq_queue_items family.
_COUNTER_NAMES = {"total_items": "added_items"}
_NOT_EXPORTED = frozenset({"pid", "time"})  # identity and wall clock, not series to store
_HELP = {
    "uptime": "Seconds since the server started.",
    "curr_connections": "Open memcache connections.",
    "total_connections": "Memcache connections made (those refused by max_connections too).",
    "rejected_connections": "Memcache connections refused because max_connections were open.",
    "pending_data_bytes": "Bytes held by sets whose data is still arriving (max_pending_data).",
    "pending_data_refusals": "Storage requests refused because max_pending_data was held.",
    "cmd_get": "Keys of get requests that reached a fetch or were refused (misses included, "
    "peeks not).",
    "cmd_set": "set requests.",
    "cmd_peek": "Keys of get requests that peeked.",
    "get_hits": "Fetches and peeks that found an item.",
    "get_misses": "Fetches and peeks that found no item.",
    "bytes_read": "Bytes received from memcache clients.",
    "bytes_written": "Bytes sent to memcache clients.",
    "curr_items": "Items in all queues.",
    "total_items": "Items added to all queues.",
    "bytes": "Bytes of the items in all queues.",
    "item_memory": "Memory the items held in RAM take over all queues: their data plus a "
    "fixed overhead each (max_memory_size of [server]).",
    "limit_maxbytes": "The most item_memory may reach before new items stay on disk only "
    "([server] max_memory_size).",
    "queue_creates": "Queues created.",
    "queue_deletes": "Queues deleted.",
    "queue_expires": "Queues deleted because they stayed empty past max_queue_age.",
}
_QUEUE_HELP = {
    "items": "Items in the queue.",
    "bytes": "Bytes of the items in the queue.",
    "total_items": "Items added to the queue.",
    "logsize": "Bytes of the queue's journal on disk.",
    "expired_items": "Items that expired in the queue.",
    "mem_items": "Items of the queue held in memory.",
    "mem_bytes": "Bytes of the queue's items held in memory.",
    "age": "Milliseconds from the add time of the most recently removed item to now.",
    "discarded": "Items dropped from the head by discard_old_when_full.",
    "waiters": "Blocked gets and peeks waiting on the queue (monitors are not counted).",
    "open_transactions": "Open reads not yet closed or aborted.",
    "transactions": "Open reads that returned an item.",
    "canceled_transactions": "Open reads aborted: their item went back to the head.",
    "total_flushes": "Flushes of the queue.",
    "journal_rewrites": "Compactions of the queue's journal.",
    "journal_rotations": "Times the queue's journal moved on to a new segment.",
    "journal_sync_errors": "fsyncs of the queue's journal that failed (the next one writes "
    "the data again).",
}


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metric_name(prefix: str, field: str, counter: bool) -> str:
    name = _UNITS.get(field, field)
    if counter:
        name = _COUNTER_NAMES.get(name, name).removeprefix("total_") + "_total"
    return prefix + name


def _label(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str) -> str:
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def metrics_pieces(
    general: list[tuple[str, object]], status: str, ready: bool, per_queue: dict[str, dict]
) -> Iterator[str]:
    """The Prometheus text exposition (format 0.0.4) of the stats, a family's head or a
    sample line at a time, so that its making can be sliced (``metrics``)."""
    fields = dict(general)
    yield _family("erq_info", "gauge", "The running erq: version and implementation, always 1.")
    yield (
        f'erq_info{{version="{_label(str(fields["version"]))}",'
        f'implementation="{_label(str(fields["implementation"]))}"}} 1\n'
    )
    yield _family("erq_status", "gauge", "The server's status (status command): 1 for the current.")
    for word in STATUSES:
        yield f'erq_status{{status="{word}"}} {int(status == word)}\n'
    yield _family("erq_ready", "gauge", "1 once recovery has finished.")
    yield f"erq_ready {int(bool(ready))}\n"
    for field, value in general:
        if field in _NOT_EXPORTED or not _numeric(value):
            continue
        counter = field in GENERAL_COUNTERS
        name = _metric_name("erq_", field, counter)
        yield _family(name, "counter" if counter else "gauge", _HELP.get(field, f"stats {field}."))
        yield f"{name} {value}\n"
    queue_fields: dict[str, None] = {}  # every queue's fields, in order of first appearance
    for stats in per_queue.values():
        queue_fields.update(dict.fromkeys(stats))
    labels = {queue: _label(queue) for queue in per_queue}
    for field in queue_fields:
        counter = field in _QUEUE_COUNTERS
        name = _metric_name("erq_queue_", field, counter)
        head = _family(
            name, "counter" if counter else "gauge", _QUEUE_HELP.get(field, f"Queue stats {field}.")
        )
        for queue, stats in per_queue.items():
            value = stats.get(field)
            if _numeric(value):  # fanout ``children`` is a name list: not a number
                if head:  # a family whose samples are all non-numeric is left out
                    yield head
                    head = ""
                yield f'{name}{{queue="{labels[queue]}"}} {value}\n'


async def metrics(state: Any) -> Reply:
    """The stats in Prometheus text format, made on the loop a slice of time at a time (as
    ``/stats.json``). On a worker thread the text would take the GIL from the loop in 5 ms
    turns: every callback of every connection waited for it, and clients flooding /metrics
    of 4,000 queues held memcache clients up to 0.25-1 s."""
    if not state.ready:
        return STARTING
    general = general_stats(state)
    status, ready = state.status, state.ready
    per_queue = await every_queue_stats(state)
    pieces: list[str] = []
    for piece in in_slices(metrics_pieces(general, status, ready, per_queue)):
        if piece is None:
            await asyncio.sleep(0)
        else:
            pieces.append(piece)
    return 200, PROMETHEUS, "".join(pieces).encode("utf-8")


Endpoint = Callable[[Any], Reply | Awaitable[Reply]]
ROUTES: dict[str, Endpoint] = {
    "/healthz": healthz,
    "/readyz": readyz,
    "/stats.json": stats_json,
    "/metrics": metrics,
}


class OneAtATime:
    """An endpoint whose document is made one at a time: the requests that come while one is
    being made share the next, begun when it ends. However many clients ask at once, the loop
    carries one document of the endpoint (64 clients asking at once for /metrics of 4,000
    queues each had theirs made, and held memcache clients 0.1-0.5 s a request for 6 s), and
    each answer is begun after its request came: it shows what its client did before asking."""

    def __init__(self, make: Callable[[Any], Awaitable[Reply]]) -> None:
        self._make = make
        self._current: asyncio.Task | None = None  # the document being made
        self._next: asyncio.Task | None = None  # the one the requests since then wait for

    def __call__(self, state: Any) -> Awaitable[Reply]:
        if self._next is None or self._next.done():  # done: cancelled before it began
            self._next = asyncio.ensure_future(self._make_next(self._current, state))
        return self._next

    async def _make_next(self, current: asyncio.Task | None, state: Any) -> Reply:
        if current is not None:
            await asyncio.wait([current])
        self._current, self._next = self._next, None
        try:
            return await self._make(state)
        finally:
            if self._current is asyncio.current_task():
                self._current = None  # its document is not kept once sent


# ---- HTTP ----------------------------------------------------------------------------------
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """RFC 9110's IMF-fixdate, in English whatever the locale. Made here rather than with
    ``email.utils.formatdate``: importing ``email.utils`` (datetime, calendar, random and the
    email package) cost the server ~1.5 MiB of RSS for this one line."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def response(status: int, content_type: str, body: bytes, *, head: bool = False) -> list[bytes]:
    """A whole HTTP/1.1 response that closes the connection, as its head and its body, the
    body not copied: the clients asking at once for a document share it while they read it
    (64 that did not read a 3.2 MB /metrics held a copy each, 200 MB). ``head`` leaves out
    the body (HEAD: the headers, Content-Length included, are those of the GET). It is
    dated, as RFC 9110 has a server with a clock date its responses."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Date: {http_date(time.time())}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: " + ", ".join(_METHODS))
    header = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return [header] if head else [header, body]


def request_path(target: bytes) -> str:
    """The path a request target names: its origin form (``/healthz?x``) or its absolute form
    (``http://host:port/healthz``, which RFC 9112 has servers accept), percent-decoded."""
    text = target.decode("ascii")
    if "://" in text:  # absolute form: the authority is ours whatever it says
        text = "/" + text.split("://", 1)[1].partition("/")[2]
    return urllib.parse.unquote(text.split("?", 1)[0].split("#", 1)[0])


async def read_head(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A request head, up to and without its blank line. Lines may end in a bare LF, which
    RFC 9112 lets a server accept (``printf 'GET /healthz HTTP/1.0\\n\\n' | nc``).
    LimitOverrunError past ``limit`` bytes, IncompleteReadError if the client ends first."""
    head = b""
    while True:
        line = await reader.readuntil(b"\n")
        if line in (b"\r\n", b"\n"):
            return head
        head += line
        if len(head) > limit:
            raise asyncio.LimitOverrunError("request head too large", len(head))


async def answer(state: Any, head: bytes, routes: dict[str, Endpoint] = ROUTES) -> list[bytes]:
    """The response to one request head (request line and headers, without the blank line)."""
    match = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0].removesuffix(b"\r"))
    if match is None:
        return response(400, TEXT, b"bad request")
    method = match[1].decode("ascii")
    is_head = method == "HEAD"
    if match[3] != b"1":
        return response(505, TEXT, b"HTTP/1.x only", head=is_head)
    path = request_path(match[2])
    endpoint = routes.get(path)
    if endpoint is None:
        return response(404, TEXT, b"not found", head=is_head)
    if method not in _METHODS:
        return response(405, TEXT, b"method not allowed")
    try:
        reply = endpoint(state)
        status, content_type, body = reply if isinstance(reply, tuple) else await reply
    except Exception:  # a bug in a stats source: answer 500, keep the listener
        log.exception("admin %s %s failed", method, path)
        return response(500, TEXT, b"internal error", head=is_head)
    return response(status, content_type, body, head=is_head)


class AdminServer:
    """The admin listener of one erq server: :meth:`start` it, :meth:`close` it at shutdown."""

    def __init__(
        self,
        state: Any,
        *,
        timeout: float = TIMEOUT,
        max_head: int = MAX_HEAD,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.state = state
        self.timeout = timeout
        self.max_head = max_head
        self.max_connections = max_connections
        self.routes: dict[str, Endpoint] = {
            path: OneAtATime(endpoint) if asyncio.iscoroutinefunction(endpoint) else endpoint
            for path, endpoint in ROUTES.items()
        }
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._handlers: dict[asyncio.StreamWriter, asyncio.Task] = {}
        # The open connections, each in one of these, longest there first: waiting on its
        # client (for its head, or to take its answer), or its answer being made.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._making: dict[asyncio.StreamWriter, None] = {}

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port. OSError if taken."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self.max_head, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        """Stop listening and drop the connections still open, their handlers cancelled: a
        stats document being made stops touching the queues, whose journals close next."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer, handler in self._handlers.items():
            writer.transport.abort()
            handler.cancel()
        self._handlers.clear()
        self._waiting.clear()
        self._making.clear()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._waiting) + len(self._making)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close gently after answering a client that may still be sending: its head (408,
        431), or a body or more requests, which are not read (one request per connection).

        Closed at once with its bytes unread, the socket would send a reset, and a client
        that reads after it writes can lose the answer to it. So: end our side, then read
        and drop what still comes, for at most LINGER seconds, before the close."""
        if writer.is_closing() or not writer.can_write_eof():
            return
        writer.write_eof()
        try:
            async with asyncio.timeout(LINGER):
                while await reader.read(self.max_head):
                    pass
        except (TimeoutError, OSError):
            pass

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Room for ``writer``: at the limit, the connection that has waited longest on its
        client is closed for it, or if none does, the one whose answer has been in the making
        longest (its handler finds it closed when the answer is made)."""
        if self.connections >= self.max_connections:
            giving_way = self._waiting or self._making
            oldest = next(iter(giving_way))
            del giving_way[oldest]
            oldest.transport.abort()
        self._handlers[writer] = asyncio.current_task()
        self._waiting[writer] = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        _limit_send_buffer(writer)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    head = await read_head(reader, self.max_head)
            except asyncio.LimitOverrunError:
                reply = response(431, TEXT, b"request head too large")
            except TimeoutError:
                reply = response(408, TEXT, b"request timeout")
            except asyncio.IncompleteReadError:
                return  # closed before a whole head: nobody to answer
            else:
                if writer.is_closing():  # reset, or closed for a newer connection meanwhile
                    return
                del self._waiting[writer]
                self._making[writer] = None
                reply = await answer(self.state, head, self.routes)
            self._waiting.pop(writer, None)
            self._making.pop(writer, None)
            if writer.is_closing():  # the client reset the connection: nobody to answer
                return
            self._waiting[writer] = None  # until the client has taken the answer
            async with asyncio.timeout(self.timeout):  # a client that does not read is dropped
                await _send(writer, reply)
                await self._linger(reader, writer)
                writer.close()
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass  # the client went away or stalled: nothing left to tell it
        except asyncio.CancelledError:
            pass  # close(): the server stops (raised on, the loop would log a traceback)
        finally:
            self._handlers.pop(writer, None)
            self._waiting.pop(writer, None)
            self._making.pop(writer, None)
            writer.transport.abort()  # a no-op once closed; else frees what a stall holds


def _limit_send_buffer(writer: asyncio.StreamWriter) -> None:
    """Cap the socket's kernel send buffer at SEND_BUFFER: a client that does not read holds
    that much of the kernel's memory, not megabytes."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass  # the client already went: the answer's write finds out


async def _send(writer: asyncio.StreamWriter, reply: list[bytes]) -> None:
    """Write ``reply`` SEND_PIECE bytes a loop pass, each once the transport has room: the
    clients answered at once share the loop, and a document is never copied whole."""
    transport = writer.transport
    transport.set_write_buffer_limits(high=SEND_PIECE)
    for part in reply:
        view = memoryview(part)
        for start in range(0, len(view), SEND_PIECE):
            if transport.is_closing():  # closed for a newer connection, or reset
                raise ConnectionResetError("the admin connection closed before its answer")
            writer.write(view[start : start + SEND_PIECE])
            await writer.drain()  # waits while the client has not taken the last piece
            await asyncio.sleep(0)  # the other connections' turn
