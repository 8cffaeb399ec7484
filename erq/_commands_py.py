# cython: annotation_typing=False
"""The per-request path (PROTOCOL.md §3, §4): ``set``, ``get`` in all its forms, and the
dispatch of one read's requests; it finds every other command in ``server_commands.COMMANDS``.

Commands know queues and sessions, never sockets. Replies are appended to ``session.out``;
a command that must close the connection calls ``session.close_after``.

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_commands.py`` with the C types of ``erq/_fast/_commands.pxd``; selector
``erq.commands``. Imports are absolute so that both builds find the same modules.
"""

from __future__ import annotations

import logging

from erq import keys as _keys
from erq import queue as _queue
from erq import wire as _wire
from erq.clock import now_ms
from erq.journal_api import JournalError
from erq.keys import KeyError_, KeySpec
from erq.monitor import reads_still_held
from erq.names import valid_queue_name
from erq.parser import REQ_BINARY, REQ_CMD, REQ_ERROR, REQ_GET, REQ_SET, REQ_UNSUPPORTED
from erq.parser import REUSED_TOKEN_MAX as _REUSED_TOKEN_MAX
from erq.queue import STORED as ITEM_STORED
from erq.queue import ExpiryBacklog, Queue
from erq.replies import (
    BAD_FORMAT,
    BAD_NAME,
    ERROR,
    JOURNAL_FAILED_LOG,
    NO_MEMORY,
    NOT_STORED,
    NOT_SUPPORTED,
    QUIESCENT,
    READ_ONLY,
    STORED,
    TOO_LARGE,
    journal_failed,
)
from erq.server_commands import COMMANDS
from erq.session import REQUESTS_PER_PASS, SLOW_OPS_PER_PASS, Session
from erq.throttle import Throttle

log = logging.getLogger("erq.commands")
_BINARY = Throttle(log, logging.WARNING)  # one line per 10 s, however many clients send it
_requests_per_pass = REQUESTS_PER_PASS  # a C integer when compiled (_commands.pxd)
_reused_key_max = _REUSED_TOKEN_MAX  # likewise
# A read's replies go out in one write once its requests ran, except on a connection the loop
# found alone ready (erq's epoll layer says so: ReplyWriter.lone). Its long pipeline's replies
# go out every SEND_EVERY requests: its client then writes its next requests while the rest
# run, instead of each side waiting for the other's whole batch, the loop idle meanwhile (one
# connection pipelining 64 sets kept the server's core ~55% busy). memcached does the same
# every 20 requests (reqs_per_event). With other connections ready the loop has their work to
# do meanwhile, and the extra sends would only cost.
SEND_EVERY = 16
_send_every = SEND_EVERY  # likewise

THIRTY_DAYS = 2_592_000
KESTREL_THRESHOLD = 1_000_000
# The latest expiry a queue and its journal can hold (ms, signed 64-bit); a later absolute
# exptime (the protocol allows up to 2**63 - 1 seconds) means the same thing: never, in practice.
MAX_EXPIRY_MS = (1 << 63) - 1


def expiry_ms(exptime: int, now: int, kestrel: bool) -> int:
    """memcached's rule (Kestrel's under compat): 0 never, small relative, big absolute.
    memcached takes up to 30 days as relative; Kestrel's MemcacheHandler, below 1,000,000
    (``expiry < 1000000``): 1,000,000 itself is a time in 1970."""
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1  # already expired
    if (exptime < KESTREL_THRESHOLD) if kestrel else (exptime <= THIRTY_DAYS):
        return now + exptime * 1000
    return min(exptime * 1000, MAX_EXPIRY_MS)


# ---- set -------------------------------------------------------------------------------
def cmd_set(session: Session, req: tuple) -> None:
    _, name, flags, exptime, data, noreply = req
    state = session.state
    state.counters.cmd_set += 1
    # Errors of the request line are silenced by noreply too (PROTOCOL §10, as memcached):
    # a client that sent it reads no reply, and a stray one would be taken for the answer
    # to its next request (pymemcache's set sends noreply by default).
    if flags is None or exptime is None:
        if not noreply:
            session.out.append(BAD_FORMAT)
        return
    queues = state.queues
    queue = queues.by_raw_name.get(name)  # a known queue's name is valid
    if queue is None and not valid_queue_name(name):
        if not noreply:
            session.out.append(BAD_NAME)
        return
    if data is None or data is False:  # over max_item_size, or NO_ROOM (max_pending_data)
        if not noreply:
            session.out.append(TOO_LARGE if data is None else NO_MEMORY)
        return
    if not state.up:
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
        JOURNAL_FAILED_LOG.log("set %s: %s", name.decode("ascii"), exc)
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
def run_keys(session: Session, specs: tuple[KeySpec, ...], gets: bool, index: int, op) -> bool:
    """Run a get's keys from ``index``, each as its own get; False when one blocked.

    ``op`` is the get's GetOperation, or None: most gets never wait, so the operation object
    is made only when a key has to (``/t=`` on an empty queue), and it then runs the rest."""
    state = session.state
    ended = False  # the last key's VALUE block holds the reply's END
    while index < len(specs):
        spec = specs[index]
        name = spec.name
        if op is not None and op.refetch:
            op.refetch = False  # this key's close, abort and checks ran before it gave way
            if state.quiescent:
                # QUIESCENT came while it removed expired items: it ends as a blocked get
                # does (PROTOCOL §3), without an item, and the keys after it are refused.
                answer_key(session, spec, None, None, gets)
                index += 1
                continue
        else:
            if spec.abort:
                session.abort_oldest(name)
            if spec.close:
                try:
                    session.close_oldest(name)
                except JournalError as exc:  # disk full: the read stays open, nothing fetched
                    JOURNAL_FAILED_LOG.log("get %s: %s", name, exc)
                    session.out.append(journal_failed(exc))
                    return True
            if not spec.fetches:
                index += 1
                continue
            counters = state.counters
            if not spec.peek:
                counters.cmd_get += 1  # refused or not: a get was asked for (PROTOCOL §10)
            if state.quiescent:
                session.out.append(refuse_rest(session, specs, index + 1))
                return True
            if spec.peek:
                counters.cmd_peek += 1  # a refused peek counts nowhere (PROTOCOL §10)
            if not spec.peek:
                if spec.open:
                    if session.at_open_limit(
                        name, state.config.server.max_open_reads
                    ) and reads_still_held(session, name, True):
                        session.close_after(ERROR)
                        return True
                elif session.has_open(name) and reads_still_held(session, name, False):
                    session.close_after(ERROR)
                    return True
        try:
            queue = state.queues.get_or_create(name)
            item = queue.peek() if spec.peek else queue.take(spec.open)
        except ExpiryBacklog:
            # Expired items fill the head: the loop serves its other sockets, then this key
            # fetches again (the batch it removed stays removed).
            if op is None:
                op = GetOperation(session, specs, gets)
            op.index = index
            op.refetch = True
            session.resume_next_pass(op)
            return False
        except JournalError as exc:  # disk full: the item stays at the head
            JOURNAL_FAILED_LOG.log("get %s: %s", name, exc)
            session.out.append(journal_failed(exc))
            return True
        # Not once the server is stopping: it answered the blocked gets END, and a later key
        # (or a get pipelined behind) that waited anew would go unanswered (PROTOCOL §6).
        if item is None and spec.timeout and not state.stopping:
            if op is None:
                op = GetOperation(session, specs, gets)
            op.index = index
            op._wait(queue, spec)
            return False
        ended = answer_key(session, spec, queue, item, gets, index + 1 == len(specs))
        index += 1
        if session.out_room < 0 and index < len(specs) and session.output_full():
            # The client is not taking its replies: the keys left wait until it does.
            if op is None:
                op = GetOperation(session, specs, gets)
            op.index = index
            session.blocked = op
            session.blocked_on_output = True
            return False
    if not ended:
        _wire.append_end(session.out)
    return True


def refuse_rest(session: Session, specs: tuple[KeySpec, ...], index: int) -> bytes:
    """Under QUIESCENT, after a refused key: the keys from ``index`` still confirm and abort
    (each key is its own get, PROTOCOL §10); their fetches are refused, gets counted. The
    reply: QUIESCENT, or a journal failure's if a confirm could not be journaled (that read
    stays open, and the keys after it do nothing)."""
    counters = session.state.counters
    while index < len(specs):
        spec = specs[index]
        if spec.abort:
            session.abort_oldest(spec.name)
        if spec.close:
            try:
                session.close_oldest(spec.name)
            except JournalError as exc:
                JOURNAL_FAILED_LOG.log("get %s: %s", spec.name, exc)
                return journal_failed(exc)
        if spec.fetches and not spec.peek:
            counters.cmd_get += 1
        index += 1
    return QUIESCENT


def answer_key(
    session: Session, spec: KeySpec, queue: Queue, item, gets: bool, last: bool = False
) -> bool:
    """Answer one key of a get: its VALUE block, or nothing for a miss. For the ``last`` key
    the block takes the reply's END too (True then): a one-key get's reply is made in one
    piece, not grown by five bytes after."""
    counters = session.state.counters
    if item is None:
        counters.get_misses += 1
        return False
    counters.get_hits += 1
    if spec.open:
        session.open_deque(spec.name).append((queue, queue.open_read(item.id)))
    elif not spec.peek:
        # Session.wait_for_sync, inline: a get that needs no sync makes no call.
        ticket = queue.sync_ticket()
        if ticket is not None:  # fsync = "always": the value waits for the removal's sync
            session.hold_for([ticket], None)
    value_block(session, spec.prefix, spec.kestrel_prefix, item, gets, last)
    return last


class GetOperation:
    """A get that waits (for an item with ``/t=``, for the client to take its replies, or for
    the loop's next pass): it holds the keys still to run."""

    __slots__ = ("session", "specs", "index", "gets", "waiter", "deadline", "refetch")

    def __init__(self, session: Session, specs: tuple[KeySpec, ...], gets: bool) -> None:
        self.session = session
        self.specs = specs
        self.index = 0
        self.gets = gets
        self.waiter: KeyWaiter | None = None
        self.deadline = 0  # of the waiter, in the server's Deadlines
        self.refetch = False  # the key at index fetches again, without its close and abort

    def run(self) -> bool:
        """Run keys from ``index``; False when it blocked waiting for an item."""
        return run_keys(self.session, self.specs, self.gets, self.index, self)

    def _wait(self, queue: Queue, spec: KeySpec) -> None:
        # Made without a call of the type (its argument parsing and __init__ were ~1,000
        # instructions of each blocked get): compiled, __new__ is the C allocation alone.
        waiter = KeyWaiter.__new__(KeyWaiter)
        waiter.active = True
        waiter.peek = spec.peek
        waiter.reliable = spec.open
        waiter.op = self
        waiter.queue = queue
        waiter.spec = spec
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


class KeyWaiter(_queue.Waiter):  # _queue: cimported under that name when compiled
    """A blocked get's place in a queue's waiter line (made by GetOperation._wait)."""

    __slots__ = ("op", "queue", "spec")

    op: GetOperation
    queue: Queue
    spec: KeySpec

    def wake(self, item) -> None:
        self.active = False
        self.op.resumed(self.spec, self.queue, item)

    def gone(self) -> bool:
        """Its client is gone already: the queue hands the item to the next waiter."""
        return self.op.session.gone()

    def expire(self) -> None:
        if self.active:
            self.active = False
            self.queue.remove_waiter(self)
            self.op.resumed(self.spec, self.queue, None)


def value_block(
    session: Session, prefix: bytes, kestrel_prefix: bytes, item, gets: bool, end: bool = False
) -> None:
    """Queue one VALUE block on ``session.out`` (with ``end``, the reply's END after it).
    ``prefix`` is ``b"VALUE <key> "``; the pieces are joined once, with the rest of the
    reply, when the session flushes."""
    cas = item.id if gets else -1
    session.out_room -= len(item.data)
    if session.state.kestrel:  # Kestrel names the queue and sends no flags
        _wire.append_value(session.out, kestrel_prefix, 0, item.data, cas, end)
    else:
        _wire.append_value(session.out, prefix, item.flags, item.data, cas, end)


def gets_asked(keys: tuple) -> int:
    """What a get refused for its keys adds to cmd_get: its keys that fetch and do not peek
    (PROTOCOL §8), as the keys of a get refused under QUIESCENT count, and each key refused
    itself, whose options are unknown."""
    asked = 0
    for key in keys:
        try:
            spec = _keys.parse_key(key)
        except KeyError_:
            asked += 1
        else:
            if spec.fetches and not spec.peek:
                asked += 1
    return asked


def cmd_get(session: Session, req: tuple) -> None:
    keys = req[1]
    if not keys:
        session.out.append(BAD_FORMAT)
        return
    try:
        # _keys.parse_key: a C call when compiled (the module is cimported under that name).
        if len(keys) > 1:
            specs = tuple([_keys.parse_key(key) for key in keys])
        else:
            # A client's gets mostly repeat one key, which its parser hands on as the same
            # object: its specs are the ones found last, without the cache's dict lookup (and
            # the bytes compare it makes when the cache holds another client's object) or a
            # new tuple. Only a key that can come as the same object again is kept (the
            # parser's reused tokens), for as long as the session lives.
            key = keys[0]
            if key is session.last_key:
                specs = session.last_specs
            else:
                specs = (_keys.parse_key(key),)
                if len(key) <= _reused_key_max:
                    session.last_key = key
                    session.last_specs = specs
    except KeyError_ as exc:
        # Refused before any key ran: each key still counts as a get asked for (PROTOCOL §10:
        # refused requests count in cmd_get), as a get refused under QUIESCENT does.
        session.state.counters.cmd_get += gets_asked(keys)
        if exc.close:
            session.close_after(exc.reply)
        else:
            session.out.append(exc.reply)
        return
    run_keys(session, specs, req[2], 0, None)


def feed(session: Session, requests: list) -> None:
    """Run one read's requests in order, then send their replies.

    A blocked request (``get q/t=``) holds back everything after it: the rest waits in
    ``session.pending`` for ``Session.run``. This loop lives here rather than in Session so that
    each request's dispatch is a C call when compiled (Session cannot cimport this module,
    which cimports it)."""
    if session.closing:
        return
    if session.pending or session.blocked is not None or session.write_paused:
        session.hold_back(requests)
        return
    queues = session.state.queues
    slow_ops = queues.slow_ops
    count = len(requests)
    turn = count if count <= _requests_per_pass else _requests_per_pass
    writer = session._writer
    send_at = _send_every if writer is not None and writer.lone else 0
    for i, request in enumerate(requests):
        dispatch(session, request)
        if session.blocked is not None or session.closing:
            if not session.closing:
                session.hold_back(requests[i + 1 :])
            break
        if session.out_room < 0 and session.output_full():
            # The client is not taking its replies: the rest waits until it does.
            session.hold_back(requests[i + 1 :])
            break
        if i + 1 == turn < count or (
            queues.slow_ops != slow_ops
            and queues.slow_ops - slow_ops >= SLOW_OPS_PER_PASS
            and i + 1 < count
        ):
            # A long pipeline, or work on the file system piling up: the other connections
            # go first.
            session.hold_back(requests[i + 1 :])
            session.give_way()
            break
        if i + 1 == send_at < count:
            send_at += _send_every
            session.flush()
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
    elif kind == REQ_UNSUPPORTED:  # add, replace, append, prepend, cas, ms: refused
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
