# cython: annotation_typing=False
"""One named queue: a strict FIFO with reliable reads, waiters, expiry and limits.

One source compiled twice: this module is the pure-Python build, and setup.py compiles it,
through the link ``erq/_fast/_queue.py`` and with the C types of
``erq/_fast/_queue.pxd``, into ``erq._fast._queue`` (selector: ``erq.queue``).
Imports are absolute so that both builds find the same modules.

The queue knows nothing of sockets or reply formats (Kestrel's PersistentQueue). Items live
in a ring buffer in RAM up to ``max_memory_size``; beyond it they stay only in the journal
and are read back as the head drains (read-behind). Every change is journaled before the
caller hears about it, so the wire layer may answer STORED as soon as ``add`` returns.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from erq import clock as _clock
from erq import item as _item
from erq.clock import now_ms
from erq.item import Item
from erq.journal_api import JournalError
from erq.ring import ITEM_OVERHEAD, Ring
from erq.throttle import Throttle

if TYPE_CHECKING:
    from erq.config import QueueConfig

log = logging.getLogger("erq.queue")
# A record read-behind cannot read (damaged on disk) fails every refill until a restart
# skips it: a line per 10 s, not one per take.
_refill_failed = Throttle(log, logging.ERROR)


class AddResult(enum.IntEnum):
    STORED = 0
    NOT_STORED = 1


# The members as plain module constants: an enum class attribute lookup goes through the
# metaclass and costs several times a global's, once per request on the set path.
STORED = AddResult.STORED
NOT_STORED = AddResult.NOT_STORED
# What add returns when there is no commit ticket (every fsync policy but "always"): made
# once, so that a set allocates no tuple for it.
_STORED_UNTICKETED = (STORED, None)
_NOT_STORED_UNTICKETED = (NOT_STORED, None)

# Expired items a fetch, or the periodic sweep, removes from a queue's head before the loop
# serves its sockets again: a million items that expired together (say, while the server was
# down) take seconds to remove, and every client would wait. A few milliseconds' work at most
# in either build.
EXPIRY_BATCH = 256
# Read-behind reads items back a step of this much memory (data + ITEM_OVERHEAD each) at a
# time, whenever a step's room is free: the reading is spread over the takes that free the
# room, ~0.1-0.2 ms at a time. Refilling half of max_memory_size at once read ~64 MiB
# (~500,000 small items) in one loop callback: a stall of ~0.4 s for every client.
REFILL_STEP = 32 * 1024


class ExpiryBacklog(Exception):
    """A fetch removed EXPIRY_BATCH expired items and more wait at the head. The caller
    fetches again later (the get, after the loop has served its sockets); nothing was
    taken, and the items removed stay removed."""


class Waiter:
    """A blocked get, peek or monitor as a queue sees it: the queue hands it an item, or it
    waits. erq.commands.KeyWaiter and erq.monitor.MonitorWaiter subclass it. A base class
    rather than a protocol, so that the compiled queue calls ``wake`` and ``gone`` in C: as
    Python-level calls they were ~2,500 of the ~21,000 instructions a woken get cost the
    server."""

    __slots__ = ("active", "peek", "reliable")

    def __init__(self, peek: bool = False, reliable: bool = False) -> None:
        self.active = True  # False once it timed out, was answered, or its connection died
        self.peek = peek
        self.reliable = reliable  # an /open read: the item becomes an open read owned by it

    def wake(self, item: Item | None) -> None:
        """The queue's item for it (taken, or looked at for a peek), or None: the queue was
        deleted, the server went QUIESCENT or is stopping."""
        raise NotImplementedError

    def gone(self) -> bool:
        """Its client is gone already (reset, or shut its side): the item goes to the next."""
        raise NotImplementedError


class OpenRead:
    """An item handed out with /open, reserved until confirmed, aborted or timed out."""

    __slots__ = ("item", "opened_at")

    def __init__(self, item: Item, opened_at: int) -> None:
        self.item = item
        self.opened_at = opened_at


class ItemMemory:
    """What the items held in RAM cost over all of a server's queues, and the most they may.

    A queue's ``max_memory_size`` bounds its own items; this bounds them together (the
    server's ``max_memory_size``), lest ``max_queues`` queues hold that many times a queue's
    limit. Each queue charges an item's data plus ITEM_OVERHEAD as it enters the queue's ring
    and gives it back as it leaves. Past ``limit``, new items stay only in the journal and are
    read back as the head drains (read-behind), as past a queue's own limit; a queue without a
    journal keeps them in memory, counted, having nowhere else to keep them."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


# A queue made without a server's ItemMemory (tests, tools) is bounded by its own limit only.
UNBOUNDED = 1 << 62


class Queue:
    """FIFO of :class:`Item` over an optional journal (``None`` = memory only)."""

    # Slots (the compiled build's fields, see _queue.pxd): an instance dict of more than 30
    # keys loses CPython 3.11's shared-key layout, and with it the fast attribute access the
    # pure-Python build relies on (+4,000 instructions per blocked-get item when it grew to 33).
    __slots__ = (
        "name",
        "_config",
        "_max_item_size",
        "_max_age",
        "_max_memory_size",
        "_limited",
        "_journal",
        "_clock",
        "_on_expired",
        "_ring",
        "_mem_bytes",
        "_memory",
        "_disk_items",
        "_disk_bytes",
        "_open",
        "_open_order",
        "_timed_opens",
        "_open_bytes",
        "_waiters",
        "_dead_waiters",
        "_serving",
        "next_id",
        "deleted",
        "created_at",
        "last_activity",
        "total_items",
        "expired_items",
        "discarded",
        "transactions",
        "canceled_transactions",
        "total_flushes",
        "_last_removed_add_time",
        "_rotations_seen",
        "_item_overhead",
        "_pops",
        "_zone_end",
        "_zone_min",
        "_last_id",
        "_spill_due",
        "_ticketed",
    )

    def __init__(
        self,
        name: str,
        config: QueueConfig,
        journal: Any = None,
        *,
        clock: Callable[[], int],
        next_id: int = 1,
        on_expired: Callable[[Queue, Item], bool] | None = None,
        memory: ItemMemory | None = None,
    ) -> None:
        self.name = name
        self._open: dict[int, OpenRead] = {}
        # With open_timeout, the reads in the order they were opened, those closed since
        # included until they reach the front or the line is rebuilt (_forget_closed_reads):
        # expire_open_reads looks from the front. (The dict's own order would do, but a dict
        # iterated after deletes at its front walks their empty slots first, until it grows.)
        self._open_order: deque[OpenRead] = deque()
        self._timed_opens = False
        self.config = config
        self._journal = journal
        if journal is not None:
            journal.on_lost = self.maybe_compact  # files deleted under it: heal it at once
        self._clock = clock
        self._on_expired = on_expired
        self._ring = Ring()
        self._mem_bytes = 0
        # The server's ItemMemory, charged what the ring holds (_mem_cost) as it changes.
        self._memory = memory if memory is not None else ItemMemory(UNBOUNDED)
        self._disk_items = 0  # read-behind: items that are only in the journal
        self._disk_bytes = 0
        self._open_bytes = 0
        self._waiters: deque[Waiter] = deque()
        # Waiters removed (a get that timed out or whose client left) stay in the line,
        # inactive, until they reach its front or there are enough of them to rebuild it: a
        # removal from the middle of 10,000 waiters was a walk of the line each.
        self._dead_waiters = 0
        self._serving = False  # _serve_waiters is running (see there)
        self.next_id = next_id
        self.deleted = False
        now = clock()
        self.created_at = now
        self.last_activity = now
        # stats
        self.total_items = 0
        self.expired_items = 0
        self.discarded = 0
        self.transactions = 0
        self.canceled_transactions = 0
        self.total_flushes = 0
        self._last_removed_add_time = -1  # none yet (a C integer when compiled: no int per get)
        self._rotations_seen = 0
        self._item_overhead = ITEM_OVERHEAD  # read per add: an attribute, a C field when compiled
        # A lower bound of the ids in the ring, cheap to keep, for the journal's release_head.
        # New items get ever larger ids, so the ring is ascending by id until an aborted read
        # goes back to the head or an item read back from disk is older than the newest one
        # (after a restart from a snapshot). Such a push opens a "zone": until _pops (items
        # taken from the head so far) reaches _zone_end, every item that was in the ring then
        # is still ahead, and no id in the ring is below _zone_min. Once they have all gone,
        # the ring is ascending again and its head has the lowest id.
        self._pops = 0
        self._zone_end = 0
        self._zone_min = 0
        self._last_id = 0  # the greatest id ever pushed at the tail
        self._spill_due = False  # a reload lowered max_memory_size: see _spill
        # add's last answer with a commit ticket (fsync = always): the appends of one batch
        # share its ticket, and so their answer, which then costs a set no tuple.
        self._ticketed: tuple | None = None

    # ---- configuration -----------------------------------------------------------------
    @property
    def config(self) -> QueueConfig:
        return self._config

    @config.setter
    def config(self, config: QueueConfig) -> None:
        # The limits read on every add are kept flat beside it (C fields when compiled).
        self._config = config
        self._max_item_size = config.max_item_size
        self._max_age = config.max_age
        self._max_memory_size = config.max_memory_size
        self._limited = config.max_items is not None or config.max_size is not None
        timed = config.open_timeout is not None
        if timed != self._timed_opens:  # the reads open now, in the order they were opened
            self._open_order = deque(self._open.values()) if timed else deque()
            self._timed_opens = timed

    # ---- sizes -------------------------------------------------------------------------
    @property
    def items(self) -> int:
        return len(self._ring) + self._disk_items

    @property
    def bytes(self) -> int:
        return self._mem_bytes + self._disk_bytes

    @property
    def mem_items(self) -> int:
        return len(self._ring)

    @property
    def mem_bytes(self) -> int:
        return self._mem_bytes

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def waiter_count(self) -> int:
        return sum(1 for w in self._waiters if w.active and not getattr(w, "monitor", False))

    @property
    def journal(self) -> Any:
        return self._journal

    def age(self, now: int) -> int:
        if self._last_removed_add_time < 0 or self.items == 0:
            return 0
        return max(0, now - self._last_removed_add_time)

    def is_full(self) -> bool:
        cfg = self.config
        return (cfg.max_items is not None and self.items >= cfg.max_items) or (
            cfg.max_size is not None and self.bytes >= cfg.max_size
        )

    # ---- adding ------------------------------------------------------------------------
    def add(self, data: bytes, flags: int, expiry: int, now: int = -1) -> tuple[AddResult, Any]:
        """Append an item, added at ``now`` (ms; the queue's clock when left out). Returns
        (result, commit ticket or None); raises JournalError."""
        # now: a C integer when compiled (-1: not given), as callers pass it: no int object.
        if now < 0:
            now = self._now()
        max_item_size = self._max_item_size
        if max_item_size is not None and len(data) > max_item_size:
            return _NOT_STORED_UNTICKETED
        if self._limited and self.is_full():
            if not self._config.discard_old_when_full:
                return _NOT_STORED_UNTICKETED
            while self.is_full() and self.items:
                self._drop_head(discard=True)
            if self.is_full():  # full with nothing to drop: a limit of 0
                return _NOT_STORED_UNTICKETED
        max_age = self._max_age
        if max_age is not None:
            cap = now + max_age
            if expiry == 0 or expiry > cap:
                expiry = cap
        item = _item.new_item(self.next_id, data, flags, now, expiry)
        ticket = self._append(item)
        self.next_id += 1
        self.total_items += 1
        self.last_activity = now
        if self._waiters:
            self._serve_waiters()
        if ticket is None:
            return _STORED_UNTICKETED
        answer = self._ticketed
        if answer is None or answer[1] is not ticket:
            answer = self._ticketed = (STORED, ticket)
        return answer

    def _now(self) -> int:
        """The queue's clock: the default one called directly (a C call when compiled)."""
        clock = self._clock
        return _clock.now_ms() if clock is now_ms else clock()

    def _append(self, item: Item) -> Any:
        cost = len(item.data) + self._item_overhead
        in_memory = (
            self._disk_items == 0
            and self._mem_cost() + cost <= self._max_memory_size
            and self._memory.used + cost <= self._memory.limit
        )
        ticket = None
        journal = self._journal
        if journal is not None:
            ticket = journal.add(
                item.id, item.flags, item.add_time, item.expiry, item.data, in_memory
            )
        elif not in_memory:
            in_memory = True  # nowhere else to keep it
        if in_memory:
            self._ring.push(item)
            self._last_id = item.id  # a new id: greater than any the queue has had
            self._mem_bytes += len(item.data)
            self._memory.used += cost
        else:
            self._disk_items += 1
            self._disk_bytes += len(item.data)
        if journal is not None and journal.rotations != self._rotations_seen:
            # A new segment: the moment to see whether history can be dropped, so disk use
            # stays near live data between sweeps. Only now is the queue state complete.
            self._rotations_seen = journal.rotations
            self.maybe_compact()
        return ticket

    def restore(self, items: list, disk_items: int, disk_bytes: int, next_id: int) -> None:
        """Load what the journal recovered (queue order; reads open at the crash are at the head)."""
        for rec in items:
            item = (
                rec
                if isinstance(rec, Item)
                else _item.new_item(rec.id, rec.data, rec.flags, rec.add_time, rec.expiry)
            )
            self._push_tail(item)
            self._mem_bytes += len(item.data)
            self._memory.used += len(item.data) + self._item_overhead
        self._disk_items = disk_items
        self._disk_bytes = disk_bytes
        self.next_id = max(self.next_id, next_id)

    # ---- taking ------------------------------------------------------------------------
    def _refill(self, ahead: bool = False) -> None:
        """Read items back from the journal, a REFILL_STEP of memory once that much of the
        budget is free (half of a budget smaller than two steps), and at least one item
        whenever the ring is empty, so the head can be served whatever the limit. Reading
        ``ahead`` of a fetch (after a take, or for the sweep to see whether the head has
        expired), an empty ring takes the head only if it fits: at the server's limit, 20
        queues that had been read from or swept each held an 8 MiB head past it (160 MiB for
        a 16 MiB limit); a fetch reads it when it comes."""
        if not self._disk_items or self._journal is None:
            return
        limit = self._max_memory_size
        budget = limit - self._mem_cost()
        shared = self._memory.limit - self._memory.used  # the server's, over all queues
        if shared < budget:
            budget = shared
        # REFILL_STEP as a local: a C integer in the compiled build (every take of a queue
        # with items on disk comes here, most of them only to return).
        step = REFILL_STEP
        if self._ring and budget < min(step, limit // 2):
            return
        # The step in items at the mean size of those on disk; read_behind also stops at
        # the step's data bytes less the overhead of that many items, whichever comes first:
        # head items larger than the mean would otherwise fill the step with their data
        # alone, their overhead on top (200-byte items ahead of empty ones: 31% past).
        step = min(budget, step)
        overhead = self._item_overhead
        # With items in the ring, the next one is read only if it fits the free budget: a
        # large one read early would sit in memory beside the limit's worth ahead of it.
        # (An empty ring takes it whatever its size, unless reading ahead of a fetch.)
        first_max = -1
        if self._ring or ahead:
            first_max = budget - overhead
            if first_max < 0:
                return
        max_items = max(1, step // (self._disk_bytes // self._disk_items + overhead))
        # Items made from their records as they are read (the compiled ring's maker does it
        # in C: no tuple and no int objects per item).
        batch = self._journal.read_behind(
            max(1, step - max_items * overhead), max_items, first_max, _item.ITEM_MAKER
        )
        for item in batch:
            self._push_tail(item)
            n = len(item.data)
            self._mem_bytes += n
            self._memory.used += n + overhead
            self._disk_items -= 1
            self._disk_bytes -= n

    def _spill(self) -> None:
        """Send the newest in-memory items back to read-behind until the rest fit
        max_memory_size (a reload lowered it), keeping the head at least, as _refill does.
        They are in the journal already, which finds their records: memory is freed, nothing
        is written. While the journal writes a snapshot, the sweep tries again later."""
        journal = self._journal
        if journal is None or self._mem_cost() <= self._max_memory_size:
            self._spill_due = False
            return
        items = self._ring.to_list()
        keep = self._items_within(items, self._max_memory_size)
        moved = journal.spill(items[keep:])
        if moved is None:
            return
        self._spill_due = False
        if not moved:
            return
        kept = len(items) - moved
        ring = self._ring
        ring.clear()
        for i in range(kept):
            ring.push(items[i])
        nbytes = 0
        for i in range(kept, len(items)):
            nbytes += len(items[i].data)
        self._mem_bytes -= nbytes
        self._memory.used -= nbytes + self._item_overhead * moved
        self._disk_items += moved
        self._disk_bytes += nbytes
        if self._pops >= self._zone_end:  # ascending: the tail has the greatest id left
            self._last_id = ring.peek_tail().id

    def _items_within(self, items: list, limit: int) -> int:
        """How many of ``items`` from the first fit in ``limit`` bytes of memory; one at least."""
        cost = 0
        n = 0
        for item in items:
            cost += len(item.data) + self._item_overhead
            if cost > limit:
                break
            n += 1
        return max(n, 1)

    def _mem_cost(self) -> int:
        """What the in-memory items really cost: their bytes plus a fixed overhead each."""
        return self._mem_bytes + self._item_overhead * len(self._ring)

    def _push_tail(self, item: Item) -> None:
        """Push an item that is not new (restored or read back) at the tail."""
        ring = self._ring
        if item.id <= self._last_id:  # out of id order: every item now in the ring is ahead
            self._zone_min = min(self._lowest_in_ring(), item.id) if ring else item.id
            self._zone_end = self._pops + len(ring) + 1
        else:
            self._last_id = item.id
        ring.push(item)

    def _push_head(self, item: Item) -> None:
        ring = self._ring
        if self._pops < self._zone_end:
            self._zone_min = min(self._zone_min, item.id)
            self._zone_end += 1  # the items that opened the zone are one further back
        elif ring and item.id > ring.peek().id:
            self._zone_min = ring.peek().id
            self._zone_end = self._pops + 1  # ascending again once this one is taken
        ring.push_front(item)

    def _lowest_in_ring(self) -> int:
        """No item in the (non-empty) ring has a lower id."""
        if self._pops < self._zone_end:
            return self._zone_min
        return self._ring.peek().id

    def lowest_live_id(self) -> int:
        """No item queued in RAM or open has a lower id; -1 when there is none."""
        lowest = self._lowest_in_ring() if self._ring else -1
        for item_id in self._open:
            if lowest < 0 or item_id < lowest:
                lowest = item_id
        return lowest

    def _pop_head(self) -> Item:
        item = self._ring.pop()
        self._pops += 1
        self._mem_bytes -= len(item.data)
        self._memory.used -= len(item.data) + self._item_overhead
        self._last_removed_add_time = item.add_time
        if self._disk_items:
            try:
                self._refill(True)
            except JournalError as exc:
                # The item is out of the queue (its removal journaled): it must reach the
                # caller. A fetch that finds the ring empty reads back again, and refuses
                # with nothing taken if the record at the head still cannot be read.
                _refill_failed.log("queue %s: %s", self.name, exc)
        return item

    def _drop_head(self, *, discard: bool) -> None:
        if not self._ring:
            self._refill()
        if self._journal is not None:
            self._journal.remove(self._ring.peek().id)  # journal first: JournalError leaves it
        self._pop_head()
        if discard:
            self.discarded += 1

    def discard_expired(
        self, now: int | None = None, limit: int | None = None, sweep: bool = False
    ) -> int:
        """Remove expired items from the head (Kestrel's rule); returns how many. The
        ``sweep`` reads a head that is only on disk back to look at it only within the
        memory limits (``_refill``): a fetch finds it expired when it comes."""
        if now is None:
            now = self._now()
        n = 0
        while (limit is None or n < limit) and self._head_expired(now, sweep):
            # Out of the ring before the move to expire_to_queue: the move may wake a get
            # blocked there whose next key fetches from this queue at once, which must find
            # the item gone (not move it again, nor have its own item popped below).
            last_removed = self._last_removed_add_time
            head = self._pop_head()
            # The move first: it may journal the removal itself, later.
            moved = self._on_expired is not None and self._on_expired(self, head)
            if self._journal is not None and not moved:
                try:
                    self._journal.remove(head.id)
                except JournalError:  # it stays at the head, as an aborted read goes back
                    self._push_head(head)
                    self._mem_bytes += len(head.data)
                    self._memory.used += len(head.data) + self._item_overhead
                    self._last_removed_add_time = last_removed
                    raise
            self.expired_items += 1
            n += 1
        return n

    def journal_removal(self, item_id: int) -> None:
        """Journal that an item no longer in the queue left it (see QueueCollection's
        expiry moves); raises JournalError."""
        if self._journal is not None:
            self._journal.remove(item_id)

    def _head_expired(self, now: int, sweep: bool = False) -> bool:
        if not self._ring:
            if not self._disk_items:
                return False
            self._refill(sweep)
            if not self._ring:  # the sweep's look: no room for the head
                return False
        return self._ring.peek().expired(now)

    def head(self, now: int = -1) -> Item | None:
        """The item a fetch would return (expired heads are removed first), or None.

        Raises ExpiryBacklog after EXPIRY_BATCH expired items with more behind them."""
        if now < 0:
            now = self._now()
        if self.discard_expired(now, EXPIRY_BATCH) == EXPIRY_BATCH and self._head_expired(now):
            raise ExpiryBacklog(self.name)
        if not self._ring:
            return None
        return self._ring.peek()

    def peek(self, now: int = -1) -> Item | None:
        """The head, left in place: what a fetch would take now. Reads past open_timeout go
        back first, as at a fetch (PROTOCOL §10), so a peek does not miss (or wait up to a
        second for the timer over) an item a get at the same moment is handed."""
        if now < 0:
            now = self._now()
        if self._open and self.config.open_timeout is not None:
            self.expire_open_reads(now)
        return self.head(now)

    def take(self, reliable: bool, now: int = -1) -> Item | None:
        """Remove and return the head; with ``reliable`` it becomes an open read."""
        if now < 0:
            now = self._now()
        if self._open and self.config.open_timeout is not None:
            self.expire_open_reads(now)
        ring = self._ring
        head = ring.peek() if ring else None
        if head is None or head.expired(now):
            head = self.head(now)  # drops expired heads, reads back from disk
            if head is None:
                return None
        journal = self._journal
        if journal is not None:
            # Journal first: a record that cannot be written (disk full) raises JournalError
            # with the item still at the head and nothing handed out.
            if reliable:
                journal.open(head.id)
            else:
                journal.remove(head.id)
        item = self._pop_head()
        self.last_activity = now  # max_queue_age: a queue just emptied is not idle
        if reliable:
            read = OpenRead(item, now)
            self._open[item.id] = read
            if self._timed_opens:
                self._open_order.append(read)
            self._open_bytes += len(item.data)
            self.transactions += 1
        return item

    def sync_ticket(self) -> Any:
        """The commit ticket this queue's latest journal write waits for (fsync = "always"),
        or None: the reply that reports a removal (a plain get's item, a close) waits for it,
        so that a power cut cannot hand the item out again."""
        journal = self._journal
        return journal._ticket if journal is not None else None

    # ---- reliable reads ----------------------------------------------------------------
    # An OpenRead is one reservation. After open_timeout returns an item, another connection
    # may reserve it again under the same id: owners hold the OpenRead, never the bare id.
    def open_read(self, item_id: int) -> OpenRead | None:
        return self._open.get(item_id)

    def is_open(self, read: OpenRead) -> bool:
        return self._open.get(read.item.id) is read

    def confirm(self, read: OpenRead) -> bool:
        """The open read is done with: the item is gone for good. Raises JournalError, the
        read still open, when the confirm cannot be journaled (disk full): one the journal
        does not hold would be undone by a restart, which hands the item out again, so it is
        refused as a get whose removal cannot be journaled is."""
        if not self.is_open(read):
            return False
        item_id = read.item.id
        if self._journal is not None:
            self._journal.confirm(item_id)
        del self._open[item_id]
        self._open_bytes -= len(read.item.data)
        if self._timed_opens:
            self._forget_closed_reads()
        self.last_activity = self._now()
        return True

    def unremove(self, read: OpenRead) -> bool:
        """Abort an open read: the item goes back to the head, to be handed out next."""
        if not self._put_back(read):
            return False
        if self._waiters:
            self._serve_waiters()
        return True

    def unremove_all(self, reads: list) -> int:
        """Abort several open reads, oldest first: all go back to the head in that order
        before a blocked get is handed the oldest (one at a time, a waiter would get the
        newest). Returns how many were still open."""
        count = 0
        for read in reversed(reads):
            if self._put_back(read):
                count += 1
        if count and self._waiters:
            self._serve_waiters()
        return count

    def unremove_every_open(self) -> int:
        """Abort every open read of every connection (a server stopping): back at the head in
        the order they were opened, as recovery puts them after a crash."""
        return self.unremove_all(list(self._open.values()))

    def _put_back(self, read: OpenRead) -> bool:
        if not self.is_open(read):
            return False
        item = read.item
        item_id = item.id
        del self._open[item_id]
        self._open_bytes -= len(item.data)
        if self._timed_opens:
            self._forget_closed_reads()
        if self._journal is not None:
            try:
                self._journal.unremove(item_id)
            except JournalError as exc:
                # Harmless: recovery puts a read the journal still calls open at the head too.
                log.warning("queue %s: abort not journaled: %s", self.name, exc)
        self._push_head(item)
        self._mem_bytes += len(item.data)
        self._memory.used += len(item.data) + self._item_overhead
        self.canceled_transactions += 1
        return True

    def expire_open_reads(self, now: int) -> int:
        """Return open reads older than ``open_timeout`` to the head, oldest at the head.

        _open holds the reads in the order they were opened, so those past the timeout come
        first and the look stops at the first that is not: every fetch asks, and a scan of
        every open read made a get cost ~0.2 ms per 10,000 reads held open on its queue. (A
        wall clock set back delays the timeout of the reads opened before it, by as much.)"""
        timeout = self.config.open_timeout
        if timeout is None or not self._open:
            return 0
        opened = self._open
        order = self._open_order
        stale = []
        while order:
            read = order[0]
            if opened.get(read.item.id) is not read:
                order.popleft()  # closed (confirmed, aborted) since
            elif now - read.opened_at < timeout:
                break
            else:
                stale.append(order.popleft())
        if not stale:
            return 0
        return self.unremove_all(stale)

    def _forget_closed_reads(self) -> None:
        # The line of reads in open order keeps those closed since until they reach its
        # front; rebuilt from the open ones once they are more than half of it.
        if len(self._open_order) > 2 * len(self._open) + 64:
            self._open_order = deque(self._open.values())

    # ---- waiters -----------------------------------------------------------------------
    def add_waiter(self, waiter: Waiter) -> None:
        # Compiled, a typed argument lets None through; both builds refuse what is not one.
        if not isinstance(waiter, Waiter):
            raise TypeError(f"a Waiter, not {type(waiter).__name__}")
        self._waiters.append(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        """Take an inactive waiter (its get timed out, or its client left) out of the line:
        at its front, or once the inactive ones are more than half of it, all at once."""
        if not isinstance(waiter, Waiter):
            raise TypeError(f"a Waiter, not {type(waiter).__name__}")
        waiter.active = False
        waiters = self._waiters
        if waiters and waiters[0] is waiter:
            waiters.popleft()
            return
        self._dead_waiters += 1
        if self._dead_waiters > 64 and 2 * self._dead_waiters > len(waiters):
            live = [w for w in waiters if w.active]
            waiters.clear()  # in place: a round serving the line holds it
            waiters.extend(live)
            self._dead_waiters = 0

    def _serve_waiters(self) -> None:
        # Not again from within: a waiter's fetch may itself put items back at the head (a
        # read past its open_timeout, returned by take), and a woken get may go on to this
        # queue's next key or abort a read. An inner round would serve the waiter this round
        # is serving, which then took a second item for it and popped another waiter (or
        # none: IndexError, the item lost). This round looks at the line and the head again
        # after each hand-out, so it serves whatever they put back.
        if self._serving:
            return
        self._serving = True
        try:
            self._serve_waiters_now()
        finally:
            self._serving = False

    def _serve_waiters_now(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            if not waiter.active:
                waiters.popleft()
                if self._dead_waiters:
                    self._dead_waiters -= 1
                continue
            if not waiter.peek and waiter.gone():
                # PROTOCOL §5: no item is lost to a dead client. Its reset (or end of stream)
                # may be in the batch of events being served, after the one that brought this
                # item; the connection's own end follows, and ends this get.
                waiters.popleft()
                continue
            try:
                item = self.peek() if waiter.peek else self.take(waiter.reliable)
            except JournalError:
                return  # the hand-out cannot be journaled (disk full): waiters wait on
            except ExpiryBacklog:
                continue  # rare: waiters wait on an empty queue, and an add serves them at once
            if item is None:
                return
            waiters.popleft()
            waiter.wake(item)

    def wake_all(self) -> None:
        """Answer every blocked get with no item (delete, QUIESCENT, shutdown)."""
        waiters, self._waiters = self._waiters, deque()
        self._dead_waiters = 0
        for waiter in waiters:
            if waiter.active:
                waiter.wake(None)

    # ---- whole-queue operations --------------------------------------------------------
    def flush(self) -> Any:
        """Drop every queued item; open reads are untouched. Returns the commit ticket the
        reply waits for (fsync = "always"), or None. The journal's record first: should it
        fail (JournalError), the queue keeps every item, as a restart would find it."""
        ticket = self._journal.flush() if self._journal is not None else None
        self._memory.used -= self._mem_cost()
        self._ring.clear()
        self._zone_end = self._pops
        self._mem_bytes = 0
        self._disk_items = 0
        self._disk_bytes = 0
        self.total_flushes += 1
        return ticket

    def delete(self) -> None:
        """Drop items, open reads and journal files; blocked gets are answered END."""
        self.deleted = True
        self._memory.used -= self._mem_cost()
        self._ring.clear()
        self._zone_end = self._pops
        for read in self._open.values():
            # Gone with the queue. The read stays in its connection's line of reads until a
            # close uses it up (or the connection ends): it need not keep the data.
            read.item.data = b""
        self._open.clear()
        self._open_order.clear()
        self._mem_bytes = self._disk_items = self._disk_bytes = self._open_bytes = 0
        if self._journal is not None:
            self._journal.delete()
            self._journal = None
        self.wake_all()

    def close(self) -> None:
        """Close the journal (JournalError if what the queue holds may not be on disk). One
        whose files were deleted and not yet written again gets a last try first, as the
        sweep would have made: a graceful stop must not leave the live state unwritten."""
        journal = self._journal
        if journal is None:
            return
        if journal.files_lost():
            journal.heal([read.item for read in self._open.values()], self._ring.to_list())
        journal.close()

    def idle_expired(self, now: int) -> bool:
        limit = self.config.max_queue_age
        return (
            limit is not None
            and not self.items
            and not self._open
            and not any(w.active for w in self._waiters)
            and now - self.last_activity >= limit
        )

    def maybe_compact(self) -> None:
        """Give back the ring's room once a burst has drained, and journal space: old
        segments the head has passed, else a compaction. But first, should the journal's files
        have been deleted under it, have the live state written again (the periodic sweep
        calls this, so a deletion is noticed within ~1 s)."""
        self._ring.shrink()
        journal = self._journal
        if journal is None:
            return
        if self._spill_due:
            self._spill()
        if journal.files_lost():
            journal.heal([read.item for read in self._open.values()], self._ring.to_list())
            return
        if journal.segment_count > 1:
            lowest = self.lowest_live_id()
            journal.release_head(lowest if lowest >= 0 else None)
        if journal.wants_compaction:
            opens = [read.item for read in self._open.values()]
            journal.compact(opens, self._ring.to_list())

    def configure(self, config: QueueConfig) -> bool:
        """A reload's settings, at once (a lowered ``max_memory_size`` frees the memory of
        the items past it: _spill); except ``journal``, which a queue has from its creation:
        a change applies at the next start, and ``dump_config`` says so meanwhile. True when
        the queue keeps its journal setting so (the reload logs those queues together)."""
        journaled = self._config.journal
        kept = config.journal != journaled
        if kept:
            config = dataclasses.replace(config, journal=journaled)
        lowered = config.max_memory_size < self._max_memory_size
        self.config = config
        if self._journal is not None:
            self._journal.update_policy(
                fsync=config.fsync,
                max_memory_size=config.max_memory_size,
                max_journal_size=config.max_journal_size,
            )
            if lowered:
                self._spill_due = True
                self._spill()
        return kept

    def stats(self, now: int) -> dict[str, int | str]:
        journal = self._journal
        return {
            "items": self.items,
            "bytes": self.bytes,
            "total_items": self.total_items,
            "logsize": journal.logsize if journal is not None else 0,
            "expired_items": self.expired_items,
            "mem_items": self.mem_items,
            "mem_bytes": self.mem_bytes,
            "age": self.age(now),
            "discarded": self.discarded,
            "waiters": self.waiter_count,
            "open_transactions": len(self._open),
            "transactions": self.transactions,
            "canceled_transactions": self.canceled_transactions,
            "total_flushes": self.total_flushes,
            "journal_rewrites": journal.rewrites if journal is not None else 0,
            "journal_rotations": journal.rotations if journal is not None else 0,
            "journal_sync_errors": journal.sync_errors if journal is not None else 0,
        }
