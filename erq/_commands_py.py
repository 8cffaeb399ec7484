# cython: annotation_typing=False
"""One function per command (PROTOCOL.md §3-§5): requests in, reply bytes out.

Commands know queues and sessions, never sockets. Replies are appended to ``session.out``;
a command that must close the connection calls ``session.close_after``.

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_commands.py`` with the C types of ``erq/_fast/_commands.pxd``; selector
``erq.commands``. Imports are absolute so that both builds find the same modules.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from erq import __version__
from erq import keys as _keys
from erq import wire as _wire
from erq._compat import IMPLEMENTATION
from erq.journal_api import JournalError
from erq.keys import KeyError_, KeySpec
from erq.parser import REQ_BINARY, REQ_CMD, REQ_ERROR, REQ_GET, REQ_SET, REQ_UNSUPPORTED
from erq.queue import STORED as ITEM_STORED
from erq.queue import Queue
from erq.queues import now_ms, valid_queue_name
from erq.session import Session
from erq.throttle import Throttle

if TYPE_CHECKING:
    from erq.state import ServerState

log = logging.getLogger("erq.commands")
_BINARY = Throttle(log, logging.WARNING)  # one line per 10 s, however many clients send it
# A full disk or a lost journal fails every request that writes: one line per 10 s, so that
# the log does not grow on that full disk at the rate of the requests.
_JOURNAL_FAILED = Throttle(log, logging.ERROR)

END = b"END\r\n"
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
DELETED = b"DELETED\r\n"
ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_NAME = b"CLIENT_ERROR bad queue name\r\n"
READ_ONLY = b"SERVER_ERROR read only\r\n"
QUIESCENT = b"SERVER_ERROR quiescent\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NOT_SUPPORTED = b"CLIENT_ERROR not supported by a queue\r\n"
STARTING = b"SERVER_ERROR starting\r\n"

THIRTY_DAYS = 2_592_000
KESTREL_THRESHOLD = 1_000_000
# The latest expiry a queue and its journal can hold (ms, signed 64-bit); a later absolute
# exptime (the protocol allows up to 2**63 - 1 seconds) means the same thing: never, in practice.
MAX_EXPIRY_MS = (1 << 63) - 1


def expiry_ms(exptime: int, now: int, kestrel: bool) -> int:
    """memcached's rule (Kestrel's threshold under compat): 0 never, small relative, big absolute."""
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1  # already expired
    if exptime <= (KESTREL_THRESHOLD if kestrel else THIRTY_DAYS):
        return now + exptime * 1000
    return min(exptime * 1000, MAX_EXPIRY_MS)


def _is_decimal(token: bytes) -> bool:
    return 0 < len(token) <= 18 and token.isdigit()


# ---- set -------------------------------------------------------------------------------
def journal_failed(exc: JournalError) -> bytes:
    """The reply to a request its queue's journal could not take (disk full, I/O error, out
    of descriptors): nothing was stored or taken, and the connection stays usable."""
    return b"SERVER_ERROR " + str(exc).encode("utf-8", "replace")[:200] + b"\r\n"


def cmd_set(session: Session, req: tuple) -> None:
    _, name, flags, exptime, data, noreply = req
    state = session.state
    state.counters.cmd_set += 1
    if flags is None or exptime is None:
        session.out.append(BAD_FORMAT)
        return
    queues = state.queues
    queue = queues.by_raw_name.get(name)  # a known queue's name is valid
    if queue is None and not valid_queue_name(name):
        session.out.append(BAD_NAME)
        return
    if data is None:
        if not noreply:
            session.out.append(TOO_LARGE)
        return
    if state.status != "UP":
        if not noreply:
            session.out.append(READ_ONLY)
        return
    try:
        result, tickets = queues.add(
            queue.name if queue is not None else name.decode("ascii"),
            data,
            flags,
            expiry_ms(exptime, now_ms(), state.kestrel) if exptime else 0,
            queue,
        )
    except JournalError as exc:
        _JOURNAL_FAILED.log("set %s: %s", name.decode("ascii"), exc)
        if not noreply:
            session.out.append(journal_failed(exc))
        return
    if result is ITEM_STORED:
        if tickets:
            session.hold_for(tickets, None if noreply else STORED)
        elif not noreply:
            session.out.append(STORED)
    elif not noreply:
        session.out.append(NOT_STORED)


# ---- get -------------------------------------------------------------------------------
def run_keys(session: Session, specs: list[KeySpec], gets: bool, index: int, op) -> bool:
    """Run a get's keys from ``index``, each as its own get; False when one blocked.

    ``op`` is the get's GetOperation, or None: most gets never wait, so the operation object
    is made only when a key has to (``/t=`` on an empty queue), and it then runs the rest."""
    state = session.state
    while index < len(specs):
        spec = specs[index]
        name = spec.name
        if spec.abort:
            session.abort_oldest(name)
        if spec.close:
            session.close_oldest(name)
        if not spec.fetches:
            index += 1
            continue
        counters = state.counters
        if not spec.peek:
            counters.cmd_get += 1  # refused or not: a get was asked for (PROTOCOL §10)
        if state.status == "QUIESCENT":
            refuse_rest(session, specs, index + 1)
            session.out.append(QUIESCENT)
            return True
        if spec.peek:
            counters.cmd_peek += 1  # a refused peek counts nowhere (PROTOCOL §10)
        if not spec.peek:
            if spec.open:
                if session.at_open_limit(name, state.config.server.max_open_reads):
                    session.close_after(ERROR)
                    return True
            elif session.has_open(name):
                session.close_after(ERROR)
                return True
        try:
            queue = state.queues.get_or_create(name)
            item = queue.head() if spec.peek else queue.take(spec.open)
        except JournalError as exc:  # disk full: the item stays at the head
            _JOURNAL_FAILED.log("get %s: %s", name, exc)
            session.out.append(journal_failed(exc))
            return True
        if item is None and spec.timeout:
            if op is None:
                op = GetOperation(session, specs, gets)
            op.index = index
            op._wait(queue, spec)
            return False
        answer_key(session, spec, queue, item, gets)
        index += 1
    _wire.append_end(session.out)  # compiled: into the VALUE block of a one-key get
    return True


def refuse_rest(session: Session, specs: list[KeySpec], index: int) -> None:
    """Under QUIESCENT, after a refused key: the keys from ``index`` still confirm and abort
    (each key is its own get, PROTOCOL §10); their fetches are refused, gets counted."""
    counters = session.state.counters
    while index < len(specs):
        spec = specs[index]
        if spec.abort:
            session.abort_oldest(spec.name)
        if spec.close:
            session.close_oldest(spec.name)
        if spec.fetches and not spec.peek:
            counters.cmd_get += 1
        index += 1


def answer_key(session: Session, spec: KeySpec, queue: Queue, item, gets: bool) -> None:
    """Answer one key of a get: its VALUE block, or nothing for a miss."""
    counters = session.state.counters
    if item is None:
        counters.get_misses += 1
        return
    counters.get_hits += 1
    if spec.open:
        session.open_deque(spec.name).append((queue, queue.open_read(item.id)))
    value_block(session, spec.prefix, spec.kestrel_prefix, item, gets)


class GetOperation:
    """A get that waits for an item (``/t=``): it holds the keys still to run."""

    __slots__ = ("session", "specs", "index", "gets", "waiter", "deadline")

    def __init__(self, session: Session, specs: list[KeySpec], gets: bool) -> None:
        self.session = session
        self.specs = specs
        self.index = 0
        self.gets = gets
        self.waiter: KeyWaiter | None = None
        self.deadline = 0  # of the waiter, in the server's Deadlines

    def run(self) -> bool:
        """Run keys from ``index``; False when it blocked waiting for an item."""
        return run_keys(self.session, self.specs, self.gets, self.index, self)

    def _wait(self, queue: Queue, spec: KeySpec) -> None:
        waiter = KeyWaiter(self, queue, spec)
        # The deadline first: nothing is left behind in the queue if it raises.
        self.deadline = self.session.state.deadlines.add(waiter, spec.timeout / 1000.0)
        self.waiter = waiter
        queue.add_waiter(waiter)
        self.session.blocked = self

    def resumed(self, spec: KeySpec, queue: Queue, item) -> None:
        """The blocked key got an item (or None on timeout / delete / QUIESCENT)."""
        self._forget_deadline()
        self.waiter = None
        answer_key(self.session, spec, queue, item, self.gets)
        self.index += 1
        if self.run():
            self.session.unblock()

    def _forget_deadline(self) -> None:
        if self.deadline:
            self.session.state.deadlines.discard(self.waiter, self.deadline)
            self.deadline = 0

    def cancel(self) -> None:
        self._forget_deadline()
        if self.waiter is not None:
            self.waiter.active = False
            self.waiter.queue.remove_waiter(self.waiter)
            self.waiter = None


class KeyWaiter:
    """A blocked get's place in a queue's waiter line."""

    __slots__ = ("op", "queue", "spec", "active", "peek", "reliable")

    def __init__(self, op: GetOperation, queue: Queue, spec: KeySpec) -> None:
        self.op = op
        self.queue = queue
        self.spec = spec
        self.active = True
        self.peek = spec.peek
        self.reliable = spec.open

    def wake(self, item) -> None:
        self.active = False
        self.op.resumed(self.spec, self.queue, item)

    def expire(self) -> None:
        if self.active:
            self.active = False
            self.queue.remove_waiter(self)
            self.op.resumed(self.spec, self.queue, None)


def value_block(session: Session, prefix: bytes, kestrel_prefix: bytes, item, gets: bool) -> None:
    """Queue one VALUE block on ``session.out``. ``prefix`` is ``b"VALUE <key> "``; the pieces
    are joined once, with the rest of the reply, when the session flushes."""
    cas = item.id if gets else -1
    if session.state.kestrel:  # Kestrel names the queue and sends no flags
        _wire.append_value(session.out, kestrel_prefix, 0, item.data, cas)
    else:
        _wire.append_value(session.out, prefix, item.flags, item.data, cas)


def cmd_get(session: Session, req: tuple) -> None:
    keys = req[1]
    if not keys:
        session.out.append(BAD_FORMAT)
        return
    try:
        # _keys.parse_key: a C call when compiled (the module is cimported under that name).
        specs = (
            [_keys.parse_key(key) for key in keys] if len(keys) > 1 else [_keys.parse_key(keys[0])]
        )
    except KeyError_ as exc:
        if exc.close:
            session.close_after(exc.reply)
        else:
            session.out.append(exc.reply)
        return
    run_keys(session, specs, req[2], 0, None)


# ---- monitor / confirm ------------------------------------------------------------------
class MonitorOperation:
    """``monitor q <seconds> [max]``: stream open reads until max items or the deadline."""

    __slots__ = ("session", "queue", "name", "remaining", "deadline", "expires", "waiter")

    def __init__(self, session: Session, queue: Queue, seconds: int, max_items: int) -> None:
        self.session = session
        self.queue = queue
        self.name = queue.name
        self.remaining = max_items
        self.deadline = time.monotonic() + seconds
        self.expires = 0  # its key in the server's Deadlines, while one is set
        self.waiter: MonitorWaiter | None = None

    def run(self) -> bool:
        session = self.session
        limit = session.state.config.server.max_open_reads
        while self.remaining > 0 and session.state.status != "QUIESCENT":
            if session.at_open_limit(self.name, limit):
                break
            try:
                item = self.queue.take(True)
            except JournalError as exc:  # disk full: the item stays at the head
                _JOURNAL_FAILED.log("monitor %s: %s", self.name, exc)
                break
            if item is None:
                delay = self.deadline - time.monotonic()
                if delay <= 0 or self.queue.deleted:
                    break
                if not self.expires:  # first: nothing is left behind if it raises
                    self.expires = session.state.deadlines.add(self, delay)
                self.waiter = MonitorWaiter(self)
                self.queue.add_waiter(self.waiter)
                session.blocked = self
                return False
            self._deliver(item)
        self._finish()
        return True

    def _deliver(self, item) -> None:
        session = self.session
        counters = session.state.counters
        counters.cmd_get += 1
        counters.get_hits += 1
        session.open_deque(self.name).append((self.queue, self.queue.open_read(item.id)))
        prefix = b"VALUE " + self.name.encode("ascii") + b" "
        value_block(session, prefix, prefix, item, False)
        session.out.append(END)
        self.remaining -= 1

    def _forget_deadline(self) -> None:
        if self.expires:
            self.session.state.deadlines.discard(self, self.expires)
            self.expires = 0

    def _finish(self) -> None:
        self._forget_deadline()
        self.session.out.append(END)

    def woken(self, item) -> None:
        self.waiter = None
        if item is None:
            self._finish()
            self.session.unblock()
            return
        self._deliver(item)
        if self.run():
            self.session.unblock()
        else:
            self.session.flush()  # stream what we have while waiting for more

    def expire(self) -> None:
        self.expires = 0
        if self.waiter is not None:
            self.waiter.active = False
            self.queue.remove_waiter(self.waiter)
            self.waiter = None
            self._finish()
            self.session.unblock()

    def cancel(self) -> None:
        if self.waiter is not None:
            self.waiter.active = False
            self.queue.remove_waiter(self.waiter)
            self.waiter = None
        self._forget_deadline()


class MonitorWaiter:
    __slots__ = ("op", "active")
    peek = False
    reliable = True
    monitor = True

    def __init__(self, op: MonitorOperation) -> None:
        self.op = op
        self.active = True

    def wake(self, item) -> None:
        self.active = False
        self.op.woken(item)


def cmd_monitor(session: Session, args: list[bytes]) -> None:
    if len(args) not in (2, 3) or not all(_is_decimal(a) for a in args[1:]):
        session.out.append(BAD_FORMAT)
        return
    if not valid_queue_name(args[0]):
        session.out.append(BAD_NAME)
        return
    state = session.state
    if state.status == "QUIESCENT":
        session.out.append(QUIESCENT)
        return
    max_items = int(args[2]) if len(args) == 3 else state.config.server.max_open_reads
    try:
        queue = state.queues.get_or_create(args[0].decode("ascii"))
    except JournalError as exc:  # its journal could not be opened (out of descriptors, ...)
        _JOURNAL_FAILED.log("monitor %s: %s", args[0].decode("ascii"), exc)
        session.out.append(journal_failed(exc))
        return
    MonitorOperation(session, queue, int(args[1]), max_items).run()


def cmd_confirm(session: Session, args: list[bytes]) -> None:
    if len(args) != 2 or not _is_decimal(args[1]):
        session.out.append(BAD_FORMAT)
        return
    if not valid_queue_name(args[0]):
        session.out.append(BAD_NAME)
        return
    name = args[0].decode("ascii")
    count = int(args[1])
    if session.live_open_count(name) < count:
        session.out.append(ERROR)
        return
    for _ in range(count):
        session.close_oldest(name)
    session.out.append(END)


# ---- queue administration ---------------------------------------------------------------
def _noreply(args: list[bytes]) -> tuple[list[bytes], bool]:
    if args and args[-1] == b"noreply":
        return args[:-1], True
    return args, False


def _one_name(session: Session, args: list[bytes]) -> str | None:
    if len(args) != 1:
        session.out.append(BAD_FORMAT)
        return None
    if not valid_queue_name(args[0]):
        session.out.append(BAD_NAME)
        return None
    return args[0].decode("ascii")


def _named_write(
    session: Session, args: list[bytes], apply: Callable[[str], None], reply: bytes
) -> None:
    """``delete``/``flush q [noreply]``: validate, refuse unless UP, apply, reply."""
    args, noreply = _noreply(args)
    name = _one_name(session, args)
    if name is None:
        return
    if session.state.status != "UP":
        if not noreply:
            session.out.append(READ_ONLY)
        return
    apply(name)
    if not noreply:
        session.out.append(reply)


def cmd_delete(session: Session, args: list[bytes]) -> None:
    _named_write(session, args, session.state.queues.delete, DELETED)


def cmd_flush(session: Session, args: list[bytes]) -> None:
    _named_write(session, args, session.state.queues.flush, END)


def cmd_flush_all(session: Session, args: list[bytes]) -> None:
    args, noreply = _noreply(args)
    if len(args) > 1 or (
        args and not (args[0].isdigit() or args[0][:1] == b"-" and args[0][1:].isdigit())
    ):
        session.out.append(BAD_FORMAT)
        return
    state = session.state
    if state.status != "UP":
        if not noreply:
            session.out.append(READ_ONLY)
        return
    state.queues.flush_all()
    if not noreply:
        session.out.append(b"Flushed all queues.\r\n" if state.kestrel else b"OK\r\n")


def cmd_flush_expired(session: Session, args: list[bytes]) -> None:
    name = _one_name(session, args)
    if name is None:
        return
    state = session.state
    if state.status != "UP":
        session.out.append(READ_ONLY)
        return
    session.out.append(b"%d\r\n" % state.queues.flush_expired(name))


def cmd_flush_all_expired(session: Session, args: list[bytes]) -> None:
    state = session.state
    if args:
        session.out.append(BAD_FORMAT)
        return
    if state.status != "UP":
        session.out.append(READ_ONLY)
        return
    session.out.append(b"%d\r\n" % state.queues.flush_all_expired())


# ---- server commands ---------------------------------------------------------------------
def cmd_version(session: Session, args: list[bytes]) -> None:
    session.out.append(b"VERSION %s\r\n" % __version__.encode())


def general_stats(state: ServerState) -> list[tuple[str, object]]:
    """The server-wide fields of ``stats`` (PROTOCOL.md §8), in order: the one list that the
    memcache ``stats`` command and the admin port's /stats.json and /metrics all read."""
    c = state.counters
    queues = state.queues
    now = time.time()
    return [
        ("pid", os.getpid()),
        ("uptime", int(now - state.started)),
        ("time", int(now)),
        ("version", __version__),
        ("implementation", IMPLEMENTATION),
        ("curr_connections", c.curr_connections),
        ("total_connections", c.total_connections),
        ("cmd_get", c.cmd_get),
        ("cmd_set", c.cmd_set),
        ("cmd_peek", c.cmd_peek),
        ("get_hits", c.get_hits),
        ("get_misses", c.get_misses),
        ("bytes_read", c.bytes_read),
        ("bytes_written", c.bytes_written),
        ("curr_items", queues.curr_items()),
        ("total_items", queues.total_items),
        ("bytes", queues.curr_bytes()),
        ("queue_creates", queues.queue_creates),
        ("queue_deletes", queues.queue_deletes),
        ("queue_expires", queues.queue_expires),
        ("status", state.status),
    ]


def cmd_stats(session: Session, args: list[bytes]) -> None:
    if args:
        session.out.append(END)  # memcached's sub-statistics do not exist for a queue server
        return
    state = session.state
    lines = [b"STAT %s %s\r\n" % (k.encode(), str(v).encode()) for k, v in general_stats(state)]
    queues = state.queues
    for name in queues.names():
        for field, value in queues.queue_stats(name).items():
            lines.append(
                b"STAT queue_%s_%s %s\r\n" % (name.encode(), field.encode(), str(value).encode())
            )
    lines.append(END)
    session.out.append(b"".join(lines))


def _dump(
    session: Session, args: list[bytes], fields: Callable[[str], list[tuple[str, object]]]
) -> None:
    for arg in args:
        if not valid_queue_name(arg):
            session.out.append(BAD_NAME)
            return
    queues = session.state.queues
    names = [a.decode("ascii") for a in args] if args else queues.names()
    lines = []
    for name in names:
        if name not in queues:
            continue
        lines.append(b"queue '%s' {\r\n" % name.encode())
        for field, value in fields(name):
            lines.append(b"  %s=%s\r\n" % (field.encode(), str(value).encode()))
        lines.append(b"}\r\n")
    lines.append(END)
    session.out.append(b"".join(lines))


def cmd_dump_stats(session: Session, args: list[bytes]) -> None:
    queues = session.state.queues
    _dump(session, args, lambda name: list(queues.queue_stats(name).items()))


def cmd_dump_config(session: Session, args: list[bytes]) -> None:
    queues = session.state.queues
    _dump(session, args, lambda name: queues.get(name).config.canonical())


def cmd_status(session: Session, args: list[bytes]) -> None:
    state = session.state
    if not args:
        session.out.append(state.status.encode() + b"\r\n")
        return
    if len(args) != 1:
        session.out.append(BAD_FORMAT)
        return
    word = args[0].decode("ascii", "replace").upper()
    if word not in ("UP", "READONLY", "QUIESCENT"):
        session.out.append(b"CLIENT_ERROR bad status\r\n")
        return
    try:
        state.set_status(word)
    except OSError as exc:  # the status would not survive a restart: keep the old one
        log.error("status %s: cannot save it: %s", word, exc)
        session.out.append(
            f"SERVER_ERROR cannot save the status: {exc.strerror or exc}\r\n".encode()
        )
        return
    session.out.append(END)


def cmd_reload(session: Session, args: list[bytes]) -> None:
    reload = session.state.reload_requested
    reply = reload() if reload is not None else "Reloaded config."
    session.out.append(reply.encode() + b"\r\n")


def cmd_verbosity(session: Session, args: list[bytes]) -> None:
    args, noreply = _noreply(args)
    if len(args) != 1 or not args[0].isdigit():
        session.out.append(BAD_FORMAT)
        return
    if not noreply:
        session.out.append(b"OK\r\n")


def cmd_shutdown(session: Session, args: list[bytes]) -> None:
    session.close_after(None)
    stop = session.state.shutdown_requested
    if stop is not None:
        session.state.loop.call_soon(stop)


def cmd_quit(session: Session, args: list[bytes]) -> None:
    session.close_after(None)


def cmd_not_supported(session: Session, args: list[bytes]) -> None:
    """incr, decr, touch: refused; silently with ``noreply``, which a client that sent it
    does not read (a reply would be taken for the answer to its next request)."""
    if not (args and args[-1] == b"noreply"):
        session.out.append(NOT_SUPPORTED)


COMMANDS: dict[bytes, Callable[[Session, list[bytes]], None]] = {
    b"delete": cmd_delete,
    b"flush": cmd_flush,
    b"flush_all": cmd_flush_all,
    b"flush_expired": cmd_flush_expired,
    b"flush_all_expired": cmd_flush_all_expired,
    b"version": cmd_version,
    b"stats": cmd_stats,
    b"dump_stats": cmd_dump_stats,
    b"dump_config": cmd_dump_config,
    b"monitor": cmd_monitor,
    b"confirm": cmd_confirm,
    b"status": cmd_status,
    b"reload": cmd_reload,
    b"verbosity": cmd_verbosity,
    b"shutdown": cmd_shutdown,
    b"quit": cmd_quit,
    b"incr": cmd_not_supported,
    b"decr": cmd_not_supported,
    b"touch": cmd_not_supported,
}


def feed(session: Session, requests: list) -> None:
    """Run one read's requests in order, then send their replies.

    A blocked request (``get q/t=``) holds back everything after it: the rest waits in
    ``session.pending`` for ``Session.run``. This loop lives here rather than in Session so that
    each request's dispatch is a C call when compiled (Session cannot cimport this module,
    which cimports it)."""
    if session.closing:
        return
    if session.pending or session.blocked is not None:
        session.pending.extend(requests)
        session.limit_pending()
        return
    for i, request in enumerate(requests):
        dispatch(session, request)
        if session.blocked is not None or session.closing:
            if not session.closing:
                session.pending.extend(requests[i + 1 :])
                session.limit_pending()
            break
    session.flush()


def dispatch(session: Session, req: tuple) -> None:
    kind = req[0]
    if kind == REQ_SET:
        cmd_set(session, req)
    elif kind == REQ_GET:
        cmd_get(session, req)
    elif kind == REQ_CMD:
        handler = COMMANDS.get(req[1])
        if handler is not None:
            handler(session, req[2])
        elif session.state.kestrel:
            session.close_after(b"CLIENT_ERROR\r\n")
        else:
            session.out.append(ERROR)
    elif kind == REQ_UNSUPPORTED:  # add, replace, append, prepend, cas: refused
        if not req[2]:  # with noreply silently, as cmd_not_supported
            session.out.append(NOT_SUPPORTED)
    elif kind == REQ_ERROR:
        if req[2]:
            session.close_after(req[1])
        else:
            session.out.append(req[1])
    elif kind == REQ_BINARY:
        _BINARY.log("binary-protocol request received; closing the connection")
        session.close_after(None)
