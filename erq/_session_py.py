# cython: annotation_typing=False
"""Session: one client connection's protocol state, independent of the socket.

It holds what Kestrel's KestrelHandler holds — the connection's open reads and the request
that is blocked waiting for an item — and the pipeline's state: requests are executed in
order (a read's by ``commands.feed``, the rest of a blocked pipeline by ``run``), a blocking
get holds back everything after it, and replies collect in one output list that the
transport writes once per read (or once per wake-up).

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_session.py`` with the C types of ``erq/_fast/_session.pxd``; selector
``erq.session``. Imports are absolute so that both builds find the same modules.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from erq import wire as _wire
from erq.parser import NO_ROOM, REQ_CMD, REQ_GET, REQ_SET
from erq.wire import ReplyWriter

if TYPE_CHECKING:
    from erq.queue import OpenRead, Queue
    from erq.state import ServerState

log = logging.getLogger("erq.session")

# Pause reading from a client whose pipeline runs this far ahead of a blocked request, in
# requests or in the bytes they hold (request_size). Behind a get that waits for an item
# (the client's to end, for as long as it likes), what comes is not parsed: the protocol
# keeps it as it came, and stops reading past MAX_UNPARSED.
MAX_PENDING = 4096
MAX_PENDING_BYTES = 8 << 20
# Replies a connection may hold that its client has not taken, in bytes (values, the long
# replies, stats, and replies waiting for a sync; other short lines are bounded by the
# requests of one read). Past it the replies go to the socket, and while the client does not
# read them (the transport's pause_writing) or they wait for a sync, no further request runs:
# a client that pipelines gets of big items without reading costs this much, not the sum of
# what it asked for.
OUT_BUDGET = 1 << 20
# Replies held back behind one that waits for a sync, in number: the short lines among them
# (a version, a miss's END) are not counted in bytes, so a client streaming them while the
# disk does not finish a sync is stopped by their number (~1 MiB of list slots).
MAX_UNSENT = OUT_BUDGET // 8
_max_unsent = MAX_UNSENT  # a C integer when compiled (_session.pxd)
# A session joins a ticket's waiters once: hold_for looks for it among the last this many
# tickets it waits for (sets round-robin over more queues join again, which costs a call
# that finds nothing to send when the sync ends, not a scan of every queue's ticket).
WAITS_LOOKED_AT = 8
_waits_looked_at = WAITS_LOOKED_AT  # a C integer when compiled
# Requests that work on the file system on the loop (QueueCollection.slow_ops: a queue made
# or deleted, the status saved; ~0.1-0.4 ms each) that one pipeline runs before it gives the
# loop back to the other connections: 4,000 gets of new names in one read held every other
# client ~270 ms, 4,000 status changes 1.7 s.
SLOW_OPS_PER_PASS = 16
# Requests of one pipeline run in a pass of the loop before the other connections get their
# turn (memcached's reqs_per_event): one client's 256 KiB read of small gets is ~37,000
# requests, which held every other client ~0.1-0.2 s (compiled) or ~0.5 s (pure Python),
# and a few such clients many times that. A pipeline of up to this many runs whole.
REQUESTS_PER_PASS = 256
_requests_per_pass = REQUESTS_PER_PASS  # a C integer when compiled (_session.pxd)
# A connection keeps a line of reads per queue name it read with /open; lines left empty are
# dropped once there are this many names more than the last time they were (a pooled
# connection reading a reply queue per request would otherwise keep one per name it met),
# and lines of reads all taken back become counts (_TakenBack).
OPEN_NAMES_SLACK = 64
# Names a connection keeps such a count for, at most: past it the oldest are forgotten (as a
# line forgets its oldest past twice max_open_reads), so that one that never closes the reads
# of reply queues deleted under it holds ~120 KB, not a count per queue it ever met.
MAX_TAKEN_BACK_NAMES = 1024


# The reply of a write whose journal sync failed (fsync = always), in place of its STORED.
SYNC_FAILED = b"SERVER_ERROR journal sync failed\r\n"


class _TakenBack:
    """Stands in the line for a read taken back (by open_timeout or a delete) that a close
    has yet to use up: it answers as its queue would, and holds neither the queue (deleted,
    perhaps) nor the read."""

    __slots__ = ()

    def is_open(self, read: Any) -> bool:
        return False

    def confirm(self, read: Any) -> bool:
        return False

    def unremove(self, read: Any) -> bool:
        return False

    def unremove_all(self, reads: list) -> int:
        return 0


_TAKEN_BACK = (_TakenBack(), None)


def _never_gone() -> bool:
    return False


def set_data_size(request: tuple) -> int:
    """The bytes of a set's data that a request holds: 0 for any other request, and for a set
    refused as it came (over ``max_item_size``: None; no room in ``max_pending_data``:
    ``NO_ROOM``), which holds none."""
    if request[0] == REQ_SET:
        data = request[4]
        if data is not None and data is not False:
            return len(data)
    return 0


# What a key or argument of a parsed request costs beyond its bytes: a bytes object's header
# (33 bytes, rounded up by the allocator) and its slot in the request's list. Counting the
# bytes alone made 5,000 gets of 340 short keys each, held behind a blocked get, count 2 KiB
# apiece where they took 19 KiB: 74 MB for the 8 MiB bound.
_PER_TOKEN = 48
_REQUEST = 120  # the request's tuple and its list


def request_size(request: tuple) -> int:
    """The memory a parsed request holds, roughly: its value, keys or arguments as objects,
    its tuple and list (what a pipeline held back costs)."""
    kind = request[0]
    if kind == REQ_SET:
        return _REQUEST + len(request[1]) + set_data_size(request)
    if kind == REQ_GET:
        keys = request[1]
        return _REQUEST + sum([len(key) for key in keys]) + _PER_TOKEN * len(keys)
    if kind == REQ_CMD:
        args = request[2]
        return _REQUEST + len(request[1]) + sum([len(arg) for arg in args]) + _PER_TOKEN * len(args)
    return _REQUEST


class Session:
    """Per-connection state and the in-order request pipeline."""

    def __init__(
        self,
        state: ServerState,
        dispatch: Callable[[Session, tuple], None],
        write: Callable[[bytes], None],
        close: Callable[[], None],
        pause: Callable[[bool], None] | None = None,
    ) -> None:
        self.state = state
        self.dispatch = dispatch  # commands.dispatch: runs one request
        self.out: list[Any] = []
        self.pending: deque = deque()
        self.pending_bytes = 0  # request_size of everything in pending
        # The data of the sets in pending, held in the server's DataBudget (max_pending_data)
        # until they run: data a client sent behind a blocked get, or while it does not read
        # its replies, is memory it makes the server hold, as much as data still arriving.
        self.pending_data = 0
        self.blocked: Any = None  # the operation waiting for an item
        self.closing = False
        self.closed = False
        self.open_reads: dict[str, deque[tuple[Queue, OpenRead]]] = {}
        # The key of this client's last one-key get and its KeySpec, as a get's specs are
        # (a tuple), for commands.cmd_get.
        self.last_key: bytes | None = None
        self.last_specs: tuple = ()
        self._names_bound = OPEN_NAMES_SLACK  # open_reads' size that drops its empty lines
        # Lines of names whose reads were all taken back, as their lengths: the closes to use
        # up before a read opened since (_compact_lines).
        self._taken_back: dict[str, int] = {}
        self._hold: Any = None  # latest commit ticket; replies wait for it
        # Replies in out that wait for commit tickets (fsync = always): their indexes in out,
        # and the tickets of each (two lists: no tuple per held reply).
        self._held_at: list[int] = []
        self._held_tickets: list[list] = []
        # Where in out each ticket still to resolve starts to hold replies back, and the
        # ticket: what comes before the first one's place may go out (_send_synced).
        self._wait_at: list[int] = []
        self._wait_tickets: list = []
        self._write = write
        # erq's own writers (the epoll layer's connection, the compiled SocketWriter) are
        # called as C methods when compiled: a Python call was ~90 instructions a reply.
        owner = getattr(write, "__self__", None)
        self._writer = owner if isinstance(owner, ReplyWriter) and write == owner.write else None
        self._close = close
        self._pause = pause
        self._paused = False
        self._input_held = False  # the protocol keeps input unparsed behind a waiting get
        self.out_room = OUT_BUDGET  # what values and long replies may add to out before it
        self.write_paused = False  # the transport holds more than its high-water mark unsent
        self.blocked_on_output = False  # blocked is a get waiting for the client to read
        self.resumes_next_pass = False  # blocked is a get that gave way to the loop
        self.input_ended = False  # the client shut its side; what it sent runs on (end_of_input)
        # Whether the client is gone, as its transport and the kernel know now (the protocol
        # sets it): a blocked get is not handed an item then. A session without a transport
        # (tests driving it directly) never is.
        self.gone: Callable[[], bool] = _never_gone

    # ---- pipeline ----------------------------------------------------------------------
    # A read's requests are run by commands.feed (a C call within the compiled commands
    # module, where every request's dispatch is); after a blocked request, by run.
    def hold_back(self, requests: list) -> None:
        """Keep requests that cannot run yet (behind a blocked one, or while the client does
        not take its replies) for ``run``; stop reading from a client whose pipeline runs
        MAX_PENDING requests or MAX_PENDING_BYTES ahead (the read that blocks counts too).
        Behind a get that waits for an item, what is held is the rest of the read's turn
        that blocked: what comes next waits unparsed in the protocol (``hold_input``).

        A set's data held back keeps room in ``max_pending_data`` until it runs. While the
        client holds the pipeline (a get waiting for an item, replies it does not take), for
        as long as it likes, a set that finds no room (unless only this connection holds
        any) drops its data here and is answered as a set refused while it came: ``SERVER_ERROR
        out of memory storing object``. A pause of the server's own (give_way, a reply
        waiting for its sync) lasts a pass of the loop or a sync: its sets are counted, never
        refused."""
        pending = self.pending
        budget = self.state.data_budget
        refusable = self.write_paused or self.blocked_on_output or self.waits_for_an_item()
        for request in requests:
            size = set_data_size(request)
            if size:
                if not refusable:
                    budget.hold(size)
                    self.pending_data += size
                elif budget.take(size, self.pending_data):
                    self.pending_data += size
                else:
                    request = request[:4] + (NO_ROOM,) + request[5:]
            pending.append(request)
            self.pending_bytes += request_size(request)
        if len(self.pending) > MAX_PENDING or self.pending_bytes > MAX_PENDING_BYTES:
            self.hold_input()

    def hold_input(self, stop_reading: bool = True) -> None:
        """Input waits until the pipeline catches up: it runs MAX_PENDING requests or
        MAX_PENDING_BYTES ahead, or a get waits for an item, for as long as the client likes,
        with requests behind it (the protocol keeps what comes then unparsed, and stops
        reading past MAX_UNPARSED). ``run``, or ``unblock`` when nothing is held, has the
        protocol go on with it (``_resume_input``)."""
        self._input_held = True
        if stop_reading and self._pause is not None and not self._paused:
            self._paused = True
            self._pause(True)

    def run(self) -> None:
        """Continue the pipeline after a blocked request finished."""
        dispatch = self.dispatch
        pending = self.pending
        queues = self.state.queues
        slow_ops = queues.slow_ops
        turn = _requests_per_pass
        while pending and self.blocked is None and not self.closing:
            if self.write_paused or (self.out_room < 0 and self.output_full()):
                break
            if turn == 0 or (
                queues.slow_ops != slow_ops and queues.slow_ops - slow_ops >= SLOW_OPS_PER_PASS
            ):
                self.give_way()
                break
            turn -= 1
            request = pending.popleft()
            self.pending_bytes -= request_size(request)
            if self.pending_data:
                size = set_data_size(request)
                if size:
                    self.pending_data -= size
                    self.state.data_budget.give(size)
            dispatch(self, request)
        if self.input_ended:
            self._close_once_answered()
        if (
            (self._paused or self._input_held)
            and len(pending) < MAX_PENDING // 2
            and self.pending_bytes < MAX_PENDING_BYTES // 2
            and not self.waits_for_an_item()
        ):
            self._resume_input()
        self.flush()

    def _resume_input(self) -> None:
        self._paused = self._input_held = False
        if self._pause is not None:
            self._pause(False)

    def give_way(self) -> None:
        """The pipeline ran REQUESTS_PER_PASS requests, or SLOW_OPS_PER_PASS requests' work on
        the file system: the rest (in pending) runs once the loop has served the other
        connections."""
        self.state.loop.call_soon(self.run)

    def unblock(self) -> None:
        """Called by a finished blocking operation (from a timer or another connection).

        Its reply goes out at once; the rest of the pipeline, if any, runs from the loop (not
        inside the set or timer that woke it)."""
        self.blocked = None
        if self.closed:
            return
        if self.pending:
            self.state.loop.call_soon(self.run)
        else:
            if self._paused or self._input_held:  # what came while a get waited runs now
                self._resume_input()
            if self.input_ended:
                self._close_once_answered()
            self.flush()

    def end_of_input(self) -> None:
        """The client shut its side (``shutdown(SHUT_WR)``, ``nc -N``) and reads on: it gets
        every reply due to what it sent, then the connection closes. Requests held back only
        because it had not yet taken its replies still run; a get blocked waiting for an item
        ends unanswered, with what was pipelined behind it, and open reads go back, as on a
        disconnect. A reply waiting for its sync keeps the connection half open until it
        goes out."""
        if (
            self.blocked_on_output
            or self.resumes_next_pass
            or (self.pending and self.blocked is None)
        ):
            self.input_ended = True  # run, or the get's end, closes it once they are answered
            return
        self.close_after(None)
        self.flush()

    def waits_for_an_item(self) -> bool:
        """A get (or monitor) of this connection is blocked until an item comes."""
        return self.blocked is not None and not (self.blocked_on_output or self.resumes_next_pass)

    def resume_next_pass(self, op: Any) -> None:
        """Block the pipeline on ``op``, a get that gave the loop back (expired items fill a
        queue's head, see queue.ExpiryBacklog): it goes on once the loop has served its
        other sockets."""
        self.blocked = op
        self.resumes_next_pass = True
        self.state.loop.call_soon(self._resume_next_pass, op)

    def _resume_next_pass(self, op: Any) -> None:
        # Not when the pass found it run already (sliced.finish_now, at shutdown).
        if self.blocked is op and self.resumes_next_pass:
            self.resumes_next_pass = False
            if self.closed:
                return
            if op.run():
                self.unblock()
            else:
                self.flush()  # what it answered so far (a monitor streams its items)

    def _close_once_answered(self) -> None:
        # A get waiting for an item ends unanswered; otherwise, close once nothing is left.
        if self.waits_for_an_item() or (self.blocked is None and not self.pending):
            self.close_after(None)

    # ---- output ------------------------------------------------------------------------
    def output_full(self) -> bool:
        """Called once the replies in ``out`` pass OUT_BUDGET (``out_room`` below 0): send
        them, and say whether the pipeline must wait, because the client is not taking them
        (the transport paused writing) or they wait for a sync. ``_output_taken`` goes on
        once it may."""
        self.flush()
        return self.write_paused or self.out_room < 0

    def writing_paused(self, paused: bool) -> None:
        """The transport's flow control (pause_writing / resume_writing)."""
        self.write_paused = paused
        if not paused:
            self._output_taken()

    def _output_taken(self) -> None:
        """The client read enough of its replies, or held ones went out: a get that stopped
        between keys for it, or the requests behind, run again (from the loop)."""
        if self.closed or self.write_paused or self.out_room < 0:
            return
        if self.blocked is not None:
            if self.blocked_on_output:
                self.blocked_on_output = False
                self.state.loop.call_soon(self._resume_output, self.blocked)
        elif self.pending:
            self.state.loop.call_soon(self.run)

    def _resume_output(self, op: Any) -> None:
        if self.blocked is op and not self.closed:
            if op.run():
                self.unblock()
            else:
                self.flush()  # what it answered so far (a monitor streams its items)

    def hold_for(self, tickets: list, reply: bytes | None) -> None:
        """Queue a reply that must wait for these commit tickets.

        Only the last one is waited for: tickets resolve in the order they were taken. The
        session joins its waiters once (a pipeline of appends shares one ticket per batch),
        and the batch's end calls it directly, without a loop callback per session. Held
        replies count against OUT_BUDGET, short as they are: a client that pipelines sets
        while a sync stalls holds a budget's worth of them, then its pipeline waits."""
        ticket = tickets[-1]
        if ticket is not self._hold:
            self._hold = ticket
            if not ticket.done and not self._waits_for(ticket):
                ticket.waiters.append(self._held_done)
                self._wait_at.append(len(self.out))
                self._wait_tickets.append(ticket)
        if reply is not None:
            self._held_at.append(len(self.out))
            self._held_tickets.append(tickets)  # shared by the batch's sets: never changed
            self.out.append(reply)
            self.out_room -= len(reply)  # a stalled sync stops the pipeline: OUT_BUDGET

    def _waits_for(self, ticket: Any) -> bool:
        # Whether the session joined the ticket's waiters lately: sets alternating between
        # two queues change _hold at every set, and a waiter joined again is called again.
        waiting = self._wait_tickets
        i = len(waiting)
        last = i - _waits_looked_at if i > _waits_looked_at else 0
        while i > last:
            i -= 1
            if waiting[i] is ticket:
                return True
        return False

    def wait_for_sync(self, ticket: Any) -> None:
        """With fsync = "always", the reply that reports a journaled removal (a close, a
        flush) waits for its sync: ``ticket`` is the queue's sync_ticket(), or None."""
        if ticket is not None:
            self.hold_for([ticket], None)

    def _held_done(self, ticket: Any) -> None:
        """A sync that replies wait for is done: they go out, up to the first that waits for
        a later one. A client that never stops pipelining sets always has a later one, and
        waited for its first reply until it stopped."""
        if self.closed:
            return
        if ticket is self._hold:
            self._hold = None
            self.flush()
        elif not self._send_synced():
            return
        if self.pending or self.blocked_on_output:
            self._output_taken()

    def _send_synced(self) -> bool:
        """Send the replies before the first that waits for a sync still to come (tickets
        resolve in the order they were taken); False when none went out."""
        at, tickets = self._wait_at, self._wait_tickets
        n = 0
        while n < len(tickets) and tickets[n].done:
            n += 1
        if n == len(tickets):  # every one is done, or none was waited for
            sent = bool(self.out)
            self.flush()
            return sent
        end = at[n]
        del at[:n]
        del tickets[:n]
        if end == 0:
            return False
        for i in range(len(at)):
            at[i] -= end
        out = self.out
        sent = out[:end]
        self.out = out[end:]
        held_at, held = self._held_at, self._held_tickets
        n = 0
        while n < len(held_at) and held_at[n] < end:
            own = held[n][0]
            if own is not None and own.error is not None:
                sent[held_at[n]] = SYNC_FAILED
            n += 1
        del held_at[:n]
        del held[:n]
        for i in range(len(held_at)):
            held_at[i] -= end
        # What is left counts whole against OUT_BUDGET (short lines too, see hold_for).
        self.out_room = OUT_BUDGET - sum([len(reply) for reply in self.out])
        data = b"".join(sent)
        self.state.counters.bytes_written += len(data)
        if self._writer is not None:
            self._writer.write(data)
        else:
            self._write(data)
        return True

    def add_long_reply(self, reply: bytes) -> None:
        """A reply that may be long (stats of many queues): counted against OUT_BUDGET."""
        self.out_room -= len(reply)
        self.out.append(reply)

    def flush(self) -> None:
        if self.closed:
            return
        if self._hold is not None and not self._hold.done:
            if self._wait_at and self._wait_at[0]:
                self._send_synced()  # the replies before the first that waits go now
            if len(self.out) > _max_unsent and self.out_room >= 0:
                self.out_room = -1  # the pipeline waits for the sync (output_full)
            return
        self._hold = None
        if self._wait_at:
            self._wait_at.clear()
            self._wait_tickets.clear()
        out = self.out
        if out:
            if self._held_at:
                self._fail_unsynced(out)
            self.out_room = OUT_BUDGET
            # One reply (a STORED, a get's fused block) goes as it is: no join, no copy. The
            # same list again, emptied (a C call when compiled, keeping its slots): none made
            # and freed per flush; emptied whatever the join does, so that a piece that is not
            # bytes fails one flush, not every one.
            try:
                data = out[0] if len(out) == 1 and type(out[0]) is bytes else b"".join(out)
            finally:
                _wire.clear_replies(out)
            self.state.counters.bytes_written += len(data)
            if self._writer is not None:
                self._writer.write(data)
            else:
                self._write(data)
        if self.closing:
            self.closed = True
            self._close()

    def _fail_unsynced(self, out: list) -> None:
        """Every held reply is due (its last ticket is done, and tickets resolve in order):
        the one whose own sync failed says so instead of its STORED. A reply's own ticket is
        its first; those after it are a fanout set's copies, whose failure is the child's."""
        at, held = self._held_at, self._held_tickets
        for i in range(len(at)):
            own = held[i][0]
            if own is not None and own.error is not None:
                out[at[i]] = SYNC_FAILED
        at.clear()
        held.clear()

    def close_after(self, reply: bytes | None) -> None:
        """Send ``reply`` (if any), then close; open reads go back at once."""
        if reply:
            self.out.append(reply)
        self.closing = True
        self._drop_pending()
        self._cancel_blocked()
        self.abort_all()

    # ---- open reads --------------------------------------------------------------------
    def open_deque(self, name: str) -> deque[tuple[Queue, OpenRead]]:
        reads = self.open_reads.get(name)
        if reads is None:
            if len(self.open_reads) >= self._names_bound:
                self._compact_lines()
            reads = self.open_reads[name] = deque()
            if self._taken_back:
                count = self._taken_back.pop(name, 0)
                if count:
                    reads.extend([_TAKEN_BACK] * count)
        return reads

    def _compact_lines(self) -> None:
        # A line whose reads were all taken back is kept as its length alone: a client that
        # leaves reads open on queues deleted under it (a reply queue per request, say) holds
        # no deleted Queue, OpenRead or Item for them, only a count per name (of the last
        # MAX_TAKEN_BACK_NAMES names).
        kept = {}
        taken_back = self._taken_back
        for name, reads in self.open_reads.items():
            if not reads:
                continue
            for queue, read in reads:
                if queue.is_open(read):
                    kept[name] = reads
                    break
            else:
                taken_back[name] = len(reads)
        excess = len(taken_back) - MAX_TAKEN_BACK_NAMES
        if excess > 0:
            for name in list(taken_back)[:excess]:  # the oldest: a dict keeps its order
                del taken_back[name]
        self.open_reads = kept
        self._names_bound = 2 * len(kept) + OPEN_NAMES_SLACK

    # A connection's reads of a queue form a line: each close, abort or confirm takes the
    # oldest one it opened. A read that open_timeout (or a delete) took back stays in the line
    # until its close comes, which then confirms nothing: the close a worker sends for an item
    # that timed out must not confirm the item it is still working on (that one would be lost
    # if the worker then died).
    def at_open_limit(self, name: str, limit: int) -> bool:
        """True when this connection holds ``limit`` live open reads on ``name``.

        Reads taken back are counted out only once the line is ``limit`` long, so a worker
        loop pays nothing; past twice the limit the oldest of them are forgotten, which
        bounds the line of a client that never closes."""
        reads = self.open_reads.get(name)
        if reads is None:
            if self._taken_back and self._taken_back.get(name, 0) >= 2 * limit:
                self._taken_back[name] = limit  # none live: forgotten as from a line
            return False
        if len(reads) < limit:
            return False
        live = self.live_open_count(name)
        if len(reads) >= 2 * limit:
            self._forget_taken_back(name, reads, len(reads) - limit)
        return live >= limit

    def _forget_taken_back(self, name: str, reads: deque, count: int) -> None:
        kept: deque = deque()
        for queue, read in reads:
            if count > 0 and not queue.is_open(read):
                count -= 1
            else:
                kept.append((queue, read))
        self.open_reads[name] = kept

    def live_open_count(self, name: str) -> int:
        """This connection's reads of ``name`` that are still open."""
        reads = self.open_reads.get(name)
        if not reads:
            return 0
        return sum(1 for queue, read in reads if queue.is_open(read))

    def unclosed_count(self, name: str) -> int:
        """The reads of ``name`` this connection opened and has not closed or aborted, those
        taken back since included: what ``confirm`` may confirm."""
        reads = self.open_reads.get(name)
        if reads is None:
            return self._taken_back.get(name, 0)
        return len(reads)

    def has_open(self, name: str) -> bool:
        if not self.open_reads:  # most connections never open a read: no lookup per get
            return False
        reads = self.open_reads.get(name)
        if not reads:
            return False
        for queue, read in reads:  # noqa: SIM110 - any() of a generator: no cpdef closures
            if queue.is_open(read):
                return True
        return False

    def close_oldest(self, name: str) -> bool:
        """Confirm this connection's oldest read of ``name``; False if there is none, or if
        it was taken back (its close is used up all the same). Raises JournalError when the
        confirm cannot be journaled: the read stays open, and the oldest."""
        reads = self.open_reads.get(name)
        if not reads:
            if reads is None and self._taken_back:
                self._use_up_taken_back(name)
            return False
        queue, read = reads[0]
        confirmed = queue.confirm(read)
        reads.popleft()
        if not confirmed:
            return False
        self.wait_for_sync(queue.sync_ticket())
        return True

    def abort_oldest(self, name: str) -> bool:
        """Put this connection's oldest read of ``name`` back at the head (as close_oldest)."""
        reads = self.open_reads.get(name)
        if not reads:
            if reads is None and self._taken_back:
                self._use_up_taken_back(name)
            return False
        queue, read = reads.popleft()
        return queue.unremove(read)

    def _use_up_taken_back(self, name: str) -> None:
        count = self._taken_back.pop(name, 0)
        if count > 1:
            self._taken_back[name] = count - 1

    def abort_all(self) -> None:
        """Return every open read to the head of its queue, oldest at the head."""
        reads_by_name, self.open_reads = self.open_reads, {}
        self._taken_back = {}
        for reads in reads_by_name.values():
            # Usually one queue per name (two once a queue was deleted and made again).
            by_queue: dict = {}
            for queue, read in reads:
                by_queue.setdefault(queue, []).append(read)
            for queue, oldest_first in by_queue.items():
                queue.unremove_all(oldest_first)

    # ---- teardown ----------------------------------------------------------------------
    def _drop_pending(self) -> None:
        self.pending.clear()
        self.pending_bytes = 0
        if self.pending_data:
            self.state.data_budget.give(self.pending_data)
            self.pending_data = 0

    def _cancel_blocked(self) -> None:
        op, self.blocked = self.blocked, None
        if op is not None:
            op.cancel()

    def connection_lost(self) -> None:
        self.closed = True
        self.closing = True
        self._drop_pending()
        self._cancel_blocked()
        self.abort_all()


__all__ = [
    "MAX_PENDING",
    "MAX_PENDING_BYTES",
    "OPEN_NAMES_SLACK",
    "OUT_BUDGET",
    "REQUESTS_PER_PASS",
    "SLOW_OPS_PER_PASS",
    "SYNC_FAILED",
    "Session",
    "request_size",
    "set_data_size",
]
