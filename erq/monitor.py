"""``monitor`` and ``confirm`` (PROTOCOL.md §5): Kestrel's streaming reliable reads.

``monitor q <seconds> [max]`` opens reads of up to ``max`` items as they come, for at most that
long, each sent at once; ``confirm q <count>`` confirms the connection's oldest open reads of the
queue. Neither is on the per-request hot path: plain Python in both builds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from erq import wire as _wire
from erq.clock import now_ms as _now_ms
from erq.journal_api import JournalError
from erq.names import valid_queue_name
from erq.queue import ExpiryBacklog, Waiter
from erq.replies import (
    BAD_FORMAT,
    BAD_NAME,
    END,
    ERROR,
    JOURNAL_FAILED_LOG,
    QUIESCENT,
    journal_failed,
)

if TYPE_CHECKING:
    from erq.queue import Queue
    from erq.session import Session


_SATURATED = 10**18


def decimal(token: bytes) -> int | None:
    """A count or a number of seconds: ASCII digits (leading zeros allowed), else None. Past
    18 digits it saturates: more than any count of reads, or any wait, can reach."""
    if not token.isdigit():  # bytes: ASCII only, and not empty
        return None
    digits = token.lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else _SATURATED


def reads_still_held(session: Session, name: str, opening: bool) -> bool:
    """The reads this connection holds on ``name`` refuse a fetch (``max_open_reads`` of them
    an /open, any a plain get, PROTOCOL §5): do they still, once the reads past the queue's
    open_timeout are returned? open_timeout is enforced at every fetch (§10), so such a read
    is held no more, whether or not the once-a-second timer came first. Asked only when the
    count refuses: a fetch it lets through pays nothing for it."""
    state = session.state
    queue = state.queues.get(name)
    if queue is None or not queue.expire_open_reads(_now_ms()):
        return True
    if opening:
        return session.at_open_limit(name, state.config.server.max_open_reads)
    return session.has_open(name)


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
        while self.remaining > 0 and not session.state.quiescent:
            if session.at_open_limit(self.name, limit) and reads_still_held(
                session, self.name, True
            ):
                break
            try:
                item = self.queue.take(True)
            except ExpiryBacklog:  # expired items fill the head: the loop serves others first
                session.resume_next_pass(self)
                return False
            except JournalError as exc:  # disk full: the item stays at the head
                JOURNAL_FAILED_LOG.log("monitor %s: %s", self.name, exc)
                break
            if item is None:
                delay = self.deadline - time.monotonic()
                # A stopping server answered the blocked gets and monitors: none waits anew.
                if delay <= 0 or self.queue.deleted or session.state.stopping:
                    break
                if not self.expires:  # first: nothing is left behind if it raises
                    self.expires = session.state.deadlines.add(self, delay)
                self.waiter = MonitorWaiter(self)
                self.queue.add_waiter(self.waiter)
                session.blocked = self
                return False
            self._deliver(item)
            if session.out_room < 0 and self.remaining > 0 and session.output_full():
                # The client is not taking its items: the next ones are read when it does,
                # so that they cost OUT_BUDGET, not max items of read-behind's disk data.
                session.blocked = self
                session.blocked_on_output = True
                return False
        self._finish()
        return True

    def _deliver(self, item) -> None:
        session = self.session
        counters = session.state.counters
        counters.cmd_get += 1
        counters.get_hits += 1
        session.open_deque(self.name).append((self.queue, self.queue.open_read(item.id)))
        session.out_room -= len(item.data)
        prefix = b"VALUE " + self.name.encode("ascii") + b" "
        flags = 0 if session.state.kestrel else item.flags  # Kestrel sends no flags
        _wire.append_value(session.out, prefix, flags, item.data, -1)
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


class MonitorWaiter(Waiter):
    __slots__ = ("op",)
    monitor = True

    def __init__(self, op: MonitorOperation) -> None:
        super().__init__(peek=False, reliable=True)  # fields a compiled queue reads in C
        self.op = op

    def wake(self, item) -> None:
        self.active = False
        self.op.woken(item)

    def gone(self) -> bool:
        return self.op.session.gone()


def cmd_monitor(session: Session, args: list[bytes]) -> None:
    numbers = [decimal(a) for a in args[1:]]
    if len(args) not in (2, 3) or None in numbers:
        session.out.append(BAD_FORMAT)
        return
    if not valid_queue_name(args[0]):
        session.out.append(BAD_NAME)
        return
    state = session.state
    if state.quiescent:
        session.out.append(QUIESCENT)
        return
    max_items = numbers[1] if len(args) == 3 else state.config.server.max_open_reads
    try:
        queue = state.queues.get_or_create(args[0].decode("ascii"))
    except JournalError as exc:  # its journal could not be opened (out of descriptors, ...)
        JOURNAL_FAILED_LOG.log("monitor %s: %s", args[0].decode("ascii"), exc)
        session.out.append(journal_failed(exc))
        return
    MonitorOperation(session, queue, numbers[0], max_items).run()


def cmd_confirm(session: Session, args: list[bytes]) -> None:
    count = decimal(args[1]) if len(args) == 2 else None
    if count is None:
        session.out.append(BAD_FORMAT)
        return
    if not valid_queue_name(args[0]):
        session.out.append(BAD_NAME)
        return
    name = args[0].decode("ascii")
    if session.unclosed_count(name) < count:  # taken back by open_timeout included
        session.out.append(ERROR)
        return
    for _ in range(count):
        try:
            session.close_oldest(name)
        except JournalError as exc:
            # Disk full: the reads confirmed so far stay confirmed; this one and the rest
            # stay open (returned to the queue with the connection, at least once).
            JOURNAL_FAILED_LOG.log("confirm %s: %s", name, exc)
            session.out.append(journal_failed(exc))
            return
    session.out.append(END)
