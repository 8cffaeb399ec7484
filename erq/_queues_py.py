# cython: annotation_typing=False
"""QueueCollection: queue names, creation, fanout children and the global counters.

It owns the data directory layout (one journal directory per queue, named after the
queue) but not the journal format, which lives in erq.journal.

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_queues.py`` with the C types of ``erq/_fast/_queues.pxd``; selector
``erq.queues``. Imports are absolute so that both builds find the same modules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erq import clock as _clock
from erq.clock import now_ms
from erq.datadir import remove_queue_dir
from erq.item import Item
from erq.journal_api import JournalError, RecoveryStopped, TooManyQueues
from erq.names import valid_queue_name
from erq.open_files import room_for_a_journal
from erq.queue import EXPIRY_BATCH, NOT_STORED, STORED, AddResult, ItemMemory, Queue
from erq.throttle import Throttle

if TYPE_CHECKING:
    from erq.config import Config

log = logging.getLogger("erq.queues")

# add's answer when there is no commit ticket (no fanout, fsync other than "always"): made
# once, so that a set allocates neither a tuple nor a list for it.
_STORED_NO_TICKETS = (STORED, ())
_NOT_STORED_NO_TICKETS = (NOT_STORED, ())
# Recovery restores a queue's items this many at a time, and lets go of the GIL and looks at
# the stop event in between: compiled, a restore is a C loop of ~0.2 s per million items (and
# the list's release another ~0.06 s), which would keep the loop thread from answering the
# admin port for that long; the pure-Python build's is ~5 s per million, which a stop signal
# would wait for.
_RESTORE_SLICE = 1 << 14


def _removed(ticket: Any, queue: Queue, item_id: int) -> None:
    """The copy of an expired item moved to its expire_to_queue is synced: journal its
    removal from the queue it left (unless that sync failed: then the item stays in both
    journals, and a restart finds it where it was, expired, to move again)."""
    if ticket.error is not None or queue.deleted:
        return
    try:
        queue.journal_removal(item_id)
    except JournalError as exc:
        log.warning(
            "queue %s: removal of moved item %d not journaled: %s", queue.name, item_id, exc
        )


class QueueCollection:
    """All queues of one server plus the server-wide item counters."""

    def __init__(
        self,
        config: Config,
        data_dir: str | os.PathLike | None,
        *,
        journal_factory: Callable[..., tuple[Any, Any]] | None = None,
        clock: Callable[[], int] = now_ms,
        background: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._journal_factory = journal_factory
        self._clock = clock
        self._background = background  # runs work off the loop (a removal's disk work)
        self._queues: dict[str, Queue] = {}
        # What the items in memory cost over every queue, bounded by the server's
        # max_memory_size: each queue charges it (see ItemMemory).
        self.memory = ItemMemory(config.server.max_memory_size)
        self.by_raw_name: dict[
            bytes, Queue
        ] = {}  # the wire's bytes -> queue: no decode per request
        # fanout parent -> its children, in the order made (a dict as an ordered set: a child
        # made or deleted among thousands finds its place at once)
        self._children: dict[str, dict[str, None]] = {}
        self.total_items = 0
        # add's last answer with a commit ticket and no fanout (fsync = always): the sets of
        # one batch to a queue share its ticket, and so this answer (its list is never
        # changed), which then costs a set neither a tuple nor a list.
        self._ticketed: tuple | None = None
        self.queue_creates = 0
        self.queue_deletes = 0
        # The process's soft limit on open files (None: none), set by the server: a new
        # queue's journal may not take what the others' syncs need (erq.open_files).
        self.open_file_limit: int | None = None
        # Requests' work on the file system, done on the loop (a queue's directory made or
        # removed, the status saved): ~0.1-0.4 ms each. A pipeline that does much of it gives
        # the loop back every SLOW_OPS_PER_PASS (commands.feed, Session.run).
        self.slow_ops = 0
        self.queue_expires = 0
        self.recovered_items = 0
        self.recovered_bytes = 0
        self.warnings: list[str] = []
        # Expired items that their expire_to_queue refuses (full, disk full): one line per
        # 10 s with the count of the others, not one per item (a full disk would take one
        # line for each of millions of items, on the disk that is full).
        self._dropped = Throttle(log, logging.WARNING)
        self._journal_kept = Throttle(log, logging.WARNING)
        self._copy_failed = Throttle(log, logging.ERROR)  # fanout copies a child's journal refused

    # ---- lookup and creation -----------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._queues

    def __iter__(self):
        return iter(list(self._queues.values()))

    def __len__(self) -> int:
        return len(self._queues)

    def names(self) -> list[str]:
        return sorted(self._queues)

    def get(self, name: str) -> Queue | None:
        return self._queues.get(name)

    def children(self, parent: str) -> list[str]:
        return list(self._children.get(parent, ()))

    def get_or_create(self, name: str) -> Queue:
        """``name``'s queue, made if it is new (TooManyQueues at ``max_queues``)."""
        queue = self._queues.get(name)
        if queue is None:
            limit = self.config.server.max_queues
            if len(self._queues) >= limit:
                raise TooManyQueues(f"too many queues (max_queues = {limit})")
            if (
                self.open_file_limit is not None
                and self.config.queue_config(name).journal
                and not room_for_a_journal(self.open_file_limit)
            ):
                raise TooManyQueues("too many queues for the open-file limit (ulimit -n)")
            queue = self._create(name)
            self.queue_creates += 1
            self.slow_ops += 1
        return queue

    def _create(self, name: str) -> Queue:
        queue, warnings = self._open(name)
        self._adopt(queue, warnings)
        return queue

    def _open(self, name: str, stop: Any = None) -> tuple[Queue, list[str]]:
        """The queue ``name`` over its journal, replayed, and recovery's warnings. Changes
        nothing of the collection: recovery runs it on a worker thread (``open_existing``),
        and ``stop`` (an Event) set meanwhile raises RecoveryStopped with the queue closed."""
        qcfg = self.config.queue_config(name)
        journal = None
        recovery = None
        if qcfg.journal and self._journal_factory is not None and self.data_dir is not None:
            # Recovery reads items into memory up to the queue's limit, or up to what the
            # queues replayed before it have left of the server's (the rest is read back as
            # the head drains, as past the queue's own).
            room = max(self.memory.limit - self.memory.used, 0)
            replay_cfg = (
                dataclasses.replace(qcfg, max_memory_size=room)
                if room < qcfg.max_memory_size
                else qcfg
            )
            journal, recovery = self._journal_factory(self.data_dir / name, replay_cfg)
        elif self._journal_factory is not None and self.data_dir is not None:
            # A memory-only queue keeps an empty directory so that the queue itself (and its
            # fanout registration) survives a restart; its items do not.
            directory = self.data_dir / name
            directory.mkdir(parents=True, exist_ok=True)
            if next(directory.glob("*.seg"), None) is not None:
                log.warning(
                    "queue %s: journal = false, so the journal in %s is not read (its items "
                    "are back if journal is turned on again; deleting the queue removes them)",
                    name,
                    directory,
                )
        queue = Queue(
            name, qcfg, journal, clock=self._clock, on_expired=self._expired, memory=self.memory
        )
        if recovery is None:
            return queue, []
        items = recovery.items
        for start in range(0, len(items) or 1, _RESTORE_SLICE):  # once at least: disk counts
            if start:
                time.sleep(0)  # not a wait: lets a thread waiting for the GIL take it
                if stop is not None and stop.is_set():
                    queue.close()
                    raise RecoveryStopped(name)
            end = start + _RESTORE_SLICE
            batch = items[start:end]
            items[start:end] = [None] * len(batch)  # each slice is freed once restored
            queue.restore(batch, recovery.disk_items, recovery.disk_bytes, recovery.next_id)
        for warning in recovery.warnings:
            log.warning("queue %s: %s", name, warning)
        return queue, [f"{name}: {warning}" for warning in recovery.warnings]

    def _adopt(self, queue: Queue, warnings: list[str]) -> None:
        """Make a queue from ``_open`` part of the collection (on the loop thread)."""
        name = queue.name
        self.warnings.extend(warnings)
        self.recovered_items += queue.items  # all recovered: nothing has reached it yet
        self.recovered_bytes += queue.bytes
        self._queues[name] = queue
        self.by_raw_name[name.encode("ascii")] = queue
        parent, plus, _child = name.partition("+")
        if plus:
            self._children.setdefault(parent, {})[name] = None

    def open_existing(self, stop: Any = None) -> list[tuple[Queue, list[str]]]:
        """Open and replay every queue that has a directory and is not in the collection
        (start-up recovery), for :meth:`adopt`. The collection is left as it is, and the
        queues and journals made are seen by no one until adopted (a journal touches the
        loop only from its first append on: fsync timers and tickets), so this may run on a
        worker thread while the loop serves the admin port. No queue may be created until
        they are adopted.

        ``stop``, a ``threading.Event``, is looked at before each queue and between the
        slices of a queue's restore: once set, every queue opened here is closed again
        (closing only syncs and unmaps) and RecoveryStopped is raised."""
        if self.data_dir is None or not self.data_dir.is_dir():
            return []
        names = [
            entry.name
            for entry in sorted(self.data_dir.iterdir())
            if entry.is_dir()
            and valid_queue_name(entry.name.encode())
            and entry.name not in self._queues
        ]
        opened: list[tuple[Queue, list[str]]] = []
        try:
            for name in names:
                if stop is not None and stop.is_set():
                    raise RecoveryStopped(name)
                opened.append(self._open(name, stop))
        except BaseException:
            for queue, _warnings in opened:
                try:
                    queue.close()
                except Exception as exc:  # the error that stopped recovery is the one to raise
                    log.warning("queue %s: closing it after recovery stopped: %s", queue.name, exc)
            raise
        return opened

    def adopt(self, opened: list[tuple[Queue, list[str]]]) -> None:
        """Add the queues of :meth:`open_existing` to the collection (on the loop thread)."""
        for queue, warnings in opened:
            self._adopt(queue, warnings)

    def load_existing(self) -> None:
        """Open every queue that has a journal directory (start-up recovery), all at once."""
        self.adopt(self.open_existing())

    # ---- item flow ---------------------------------------------------------------------
    def add(
        self, name: str, data: bytes, flags: int, expiry: int, queue: Queue | None = None
    ) -> tuple[AddResult, list | tuple]:
        """Add to ``name`` and a copy to each fanout child; the result is the parent's, with the
        commit tickets to wait for (empty when there are none)."""
        # The default clock called directly: a C call when compiled, no callable lookup.
        now = _clock.now_ms() if self._clock is now_ms else self._clock()
        created = False
        if queue is None:
            queue = self._queues.get(name)
            if queue is None:
                queue, created = self.get_or_create(name), True
        # The children as they are when the set comes, taken before any add: an add may wake
        # a get whose next key makes a new child, which exists only from after this set
        # (PROTOCOL §7) and gets no copy of it.
        kids = ()
        if self._children:
            found = self._children.get(name)
            if found is not None:
                kids = tuple(found)
        if created:
            result, ticket = self._add_to_new(queue, data, flags, expiry, now)
        else:
            result, ticket = queue.add(data, flags, expiry, now)
        if result is STORED:
            self.total_items += 1
        if not kids:
            if ticket is None:  # the usual case: no fanout, no fsync = "always"
                return _STORED_NO_TICKETS if result is STORED else _NOT_STORED_NO_TICKETS
            answer = self._ticketed
            if answer is None or answer[1][0] is not ticket or answer[0] is not result:
                answer = self._ticketed = (result, [ticket])
            return answer
        # The reply's own ticket first (None: the parent's add took none), then the copies':
        # the reply waits for them all, and fails only with its own (PROTOCOL §7: a set's
        # reply is its parent's; Session._fail_unsynced).
        tickets = [ticket]
        for child_name in kids:
            child = self._queues.get(child_name)
            if child is None:
                continue
            try:
                child_result, child_ticket = child.add(data, flags, expiry, now)
            except JournalError as exc:
                # The parent has the item and the set's reply is the parent's (PROTOCOL §7):
                # a child whose journal fails (its disk full, say) misses the copy, as one
                # that refuses it, and the children after it still get theirs.
                self._copy_failed.log("fanout copy to %s not stored: %s", child_name, exc)
                continue
            if child_result is STORED:
                self.total_items += 1
                if child_ticket is not None:
                    tickets.append(child_ticket)
        if ticket is None and len(tickets) == 1:
            return _STORED_NO_TICKETS if result is STORED else _NOT_STORED_NO_TICKETS
        return result, tickets

    def _add_to_new(self, queue: Queue, data: bytes, flags: int, expiry: int, now: int) -> tuple:
        """``queue.add`` to a queue made for it. PROTOCOL §10: a refused request creates no
        queue, whether the queue refused it (full, too large) or its first segment could not
        be made (disk full, no descriptors). Apart from ``add``: its ``try`` costs every set."""
        try:
            result, ticket = queue.add(data, flags, expiry, now)
        except JournalError:
            self._unmake(queue.name)
            raise
        if result is not STORED:
            self._unmake(queue.name)
        return result, ticket

    def _unmake(self, name: str) -> None:
        """PROTOCOL §10: a refused request creates no queue. The one ``add`` made for it goes,
        directory included, and counts neither as created nor as deleted."""
        self.delete(name)
        self.queue_creates -= 1
        self.queue_deletes -= 1

    def _expired(self, queue: Queue, item: Item) -> bool:
        """An expired item leaves ``queue``'s head: to its expire_to_queue, if any, first.
        True when the move took over the journaling of its removal from ``queue``: with
        fsync = "always" the removal is written only once the copy is synced, so that no
        power cut finds the one without the other (at worst both: a duplicate)."""
        target = queue.config.expire_target(queue.name)
        if target and valid_queue_name(target.encode()):
            try:
                result, ticket = self._move(target, item)
            except JournalError as exc:  # the removal is journaled next: say what is lost
                result, ticket, why = None, None, str(exc)
            else:
                limit = self.config.queue_config(target).max_item_size
                too_large = limit is not None and len(item.data) > limit
                why = f"over its max_item_size ({limit} bytes)" if too_large else "it is full"
            if result is STORED:
                self.total_items += 1
                if ticket is not None and queue.journal is not None:
                    ticket.add_waiter(
                        lambda done, queue=queue, id=item.id: _removed(done, queue, id)
                    )
                    return True
            else:
                # Kestrel drops it too; a log line makes the loss visible.
                self._dropped.log(
                    "queue %s: expired item %d dropped, %s refused it: %s",
                    queue.name,
                    item.id,
                    target,
                    why,
                )
        return False

    def _move(self, target: str, item: Item) -> tuple:
        """Add an expired item, without its expiry, to ``target``. A target made for it goes
        again if it refuses the item (full, too large, disk full): PROTOCOL §10, a queue is
        made only for what it accepts, and no queue nobody asked for outlives the move."""
        queue = self._queues.get(target)
        if queue is not None:
            return queue.add(item.data, item.flags, 0)
        queue = self.get_or_create(target)
        return self._add_to_new(queue, item.data, item.flags, 0, self._clock())

    # ---- whole queues ------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        queue = self._queues.pop(name, None)
        if queue is None:
            return False
        self.by_raw_name.pop(name.encode("ascii"), None)
        memory_only = queue.journal is None
        if memory_only and self._journal_factory is not None and self.data_dir is not None:
            remove_queue_dir(self.data_dir / name, self._background, durable_now=False)
        parent, plus, _ = name.partition("+")
        if plus and parent in self._children:
            kids = self._children[parent]
            kids.pop(name, None)
            if not kids:
                del self._children[parent]
        self.queue_deletes += 1
        self.slow_ops += 1
        # Last: it answers the queue's blocked gets, and a get's next key may make the queue
        # again at once. That one must find the collection, the fanout registry and the data
        # directory without this queue, not be unregistered or lose its directory after.
        queue.delete()
        return True

    def flush(self, name: str) -> Any:
        """Flush one queue; the commit ticket its reply waits for, or None."""
        queue = self._queues.get(name)
        return queue.flush() if queue is not None else None

    def flush_all(self) -> Any:
        """Flush every queue; the last commit ticket taken (tickets resolve in order). A
        queue whose journal refuses its flush keeps its items, the others are flushed, and
        the first such JournalError is raised at the end."""
        last = None
        failed = None
        for queue in list(self):
            try:
                ticket = queue.flush()
            except JournalError as exc:
                failed = failed or exc
                continue
            if ticket is not None:
                last = ticket
        if failed is not None:
            raise failed
        return last

    def flush_expired(self, name: str, limit: int | None = None) -> int:
        """Remove the expired items at ``name``'s head, ``limit`` at most; how many
        (JournalError when the journal refuses a removal: that item and those after it
        stay). The ``flush_expired`` commands remove them EXPIRY_BATCH at a time, between
        which the loop may serve its sockets (erq.sliced)."""
        queue = self._queues.get(name)
        return queue.discard_expired(None, limit) if queue is not None else 0

    def sweep(self, expire: bool = True) -> None:
        """Periodic work on every queue at once (see sweep_queue)."""
        for queue in self:
            while self.sweep_queue(queue, expire):
                pass

    def sweep_queue(self, queue: Queue, expire: bool = True) -> bool:
        """Periodic work on one queue: expiry at its head, open-read timeouts, idle expiry,
        compaction and its journal's files. The server spreads a sweep over loop passes, a
        slice of queues at a time, so a queue deleted since the sweep began is left alone.

        True when it stopped after EXPIRY_BATCH expired items with more at the head:
        the caller sweeps the queue again, after the loop has served its sockets if its slice
        of time is up."""
        if self._queues.get(queue.name) is not queue:
            return False
        now = self._clock()
        try:
            if expire and queue.discard_expired(now, EXPIRY_BATCH, True) == EXPIRY_BATCH:
                return True
            queue.expire_open_reads(now)
        except JournalError as exc:  # the head stays for a later sweep; the rest goes on
            log.debug("queue %s: expiry waits for its journal: %s", queue.name, exc)
        if queue.idle_expired(now):
            self.delete(queue.name)
            self.queue_deletes -= 1
            self.queue_expires += 1
            return False
        queue.maybe_compact()
        return False

    def reconfigure(self, config: Config) -> None:
        self.config = config
        # A lower limit keeps new items on disk until the queues' takes bring memory under
        # it; what is in memory stays (a queue's own lower max_memory_size frees its at once).
        self.memory.limit = config.server.max_memory_size
        kept = [queue for queue in self if queue.configure(config.queue_config(queue.name))]
        if kept:  # one line for them all, and not one per reload: any client may send reload
            shown = ", ".join(
                f"{queue.name} (journal = {'true' if queue.config.journal else 'false'})"
                for queue in kept[:10]
            )
            self._journal_kept.log(
                "journal changed for %d queue(s); each keeps its setting until the next start: "
                "%s%s",
                len(kept),
                shown,
                f" and {len(kept) - 10} more" if len(kept) > 10 else "",
            )

    def close(self) -> list[str]:
        """Close every queue (its journal syncs a last time); the names of those whose last
        sync failed, each logged. One failure does not keep the other queues from theirs."""
        failed = []
        for queue in self:
            try:
                queue.close()
            except JournalError as exc:
                log.error("queue %s: %s (its last, at shutdown)", queue.name, exc)
                failed.append(queue.name)
        return failed

    # ---- stats -------------------------------------------------------------------------
    def curr_items(self) -> int:
        return sum(q.items for q in self._queues.values())

    def curr_bytes(self) -> int:
        return sum(q.bytes for q in self._queues.values())

    def queue_stats(self, name: str) -> dict[str, int | str] | None:
        queue = self._queues.get(name)
        if queue is None:
            return None
        stats = queue.stats(self._clock())
        kids = self._children.get(name)
        if kids:
            stats["children"] = ",".join(kids)
        return stats
