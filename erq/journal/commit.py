"""Group commit: one fsync job, on a dedicated thread, for every journal written in a loop
iteration.

A journal with ``fsync = "always"`` asks for a ticket after each append. The first ticket of
an iteration schedules a batch with ``call_soon``; it runs after every callback of the
iteration (so every append made meanwhile joins it), takes the dirty segments of all
journals in the batch and hands them to the fsync thread through a queue: the loop never
waits for a disk. Appends that arrive while a batch is syncing wait for the next batch. When
the thread has synced a batch it posts one callback to the loop, which first hands the next
batch to the thread (so its fsync runs while this one's replies are released), then resolves
this batch's tickets. A ticket is an asyncio Future shared by the appends of one journal in
one batch; it resolves after the sync, or fails with JournalError (the data stays pending and
the next sync retries it). Batches finish in the order they started.

A journal with a period arms a timer at its first unsynced append; the timer syncs it in the
executor. Appends never wait for that.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..journal_api import JournalError

if TYPE_CHECKING:
    from .journal import QueueJournal, SyncWork

log = logging.getLogger("erq.journal")


def _sync_all(work: list[tuple[QueueJournal, SyncWork]]) -> dict[QueueJournal, JournalError]:
    """Thread side of a batch: sync every journal's segments, collect the failures."""
    errors = {}
    for journal, targets in work:
        try:
            journal.sync_work(targets)
        except JournalError as exc:
            errors[journal] = exc
    return errors


class _Batch:
    """The tickets of one group fsync and what it syncs; ``errors`` once it ran."""

    __slots__ = ("tickets", "work", "errors", "done")

    def __init__(self, tickets: dict[QueueJournal, asyncio.Future], done) -> None:
        self.tickets = tickets
        self.work = [(journal, journal.take_dirty()) for journal in tickets]
        self.errors: dict[QueueJournal, JournalError] | None = None  # None: not synced
        self.done = done  # GroupCommit._batch_done, bound


def _fsync_thread(jobs: queue.SimpleQueue, loop: asyncio.AbstractEventLoop) -> None:
    """Run batches in order until told to stop (None); post each one back to the loop.

    Holds no reference to the GroupCommit between batches, so one that is dropped without
    close() is collected, and its finalizer stops this thread."""
    while True:
        batch = jobs.get()
        if batch is None:
            return
        try:
            batch.errors = _sync_all(batch.work)
        except Exception as exc:  # not a JournalError: a bug, but the tickets must not hang
            error = JournalError(f"fsync failed: {exc}")
            batch.errors = {journal: error for journal, _ in batch.work}
        try:
            loop.call_soon_threadsafe(batch.done, batch)
        except RuntimeError:  # the loop is closed: nobody waits for these tickets any more
            pass
        batch = None


class GroupCommit:
    """One per server: batches fsyncs of ``always`` journals and runs periodic ones."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None = None, *, max_workers: int = 4
    ) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        # Periodic syncs and the final drain; group commits have their own thread.
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="erq-fsync")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop_thread: weakref.finalize | None = None  # the thread ends after its batch
        self._pending: dict[QueueJournal, asyncio.Future] = {}
        self._running: _Batch | None = None  # the batch on the fsync thread
        self._idle_waiters: list[asyncio.Future] = []  # drain() waiting for _running to end
        self._scheduled = False
        self._journals: set[QueueJournal] = set()
        self._closed = False
        self.batches = 0  # group fsync jobs started

    # ---- journals ------------------------------------------------------------------------
    def register(self, journal: QueueJournal) -> None:
        self._journals.add(journal)

    def unregister(self, journal: QueueJournal) -> None:
        self._journals.discard(journal)

    def ticket(self, journal: QueueJournal) -> asyncio.Future:
        """A future that resolves once ``journal``'s appends so far are on disk."""
        fut = self._pending.get(journal)
        if fut is None:
            fut = self.loop.create_future()
            if self._closed:
                self._sync_now(journal, fut)
                return fut
            self._pending[journal] = fut
            if not self._scheduled and self._running is None:
                self._scheduled = True
                self.loop.call_soon(self._start_batch)
        return fut

    def _sync_now(self, journal: QueueJournal, fut: asyncio.Future) -> None:
        try:
            journal.sync()
        except JournalError as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    def _start_batch(self) -> None:
        self._scheduled = False
        if self._running is not None or not self._pending or self._closed:
            return
        batch = _Batch(self._pending, self._batch_done)
        self._pending = {}
        self._running = batch
        self.batches += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=_fsync_thread,
                args=(self._jobs, self.loop),
                name="erq-group-commit",
                daemon=True,
            )
            self._thread.start()
            self._stop_thread = weakref.finalize(self, self._jobs.put, None)
        self._jobs.put(batch)

    def _batch_done(self, batch: _Batch) -> None:
        """On the loop, once per synced batch: hand what failed back to its journals (the
        next sync retries it), start the next batch, then answer this one's tickets."""
        if batch is not self._running:
            return  # close() answered it already
        self._running = None
        errors = batch.errors
        if errors is None:  # the thread did not run it (it cannot have failed to, but never OK)
            error = JournalError("fsync did not run")
            errors = {journal: error for journal in batch.tickets}
        if errors:
            for journal, targets in batch.work:
                if journal in errors:
                    journal.restore_dirty(targets)
        if self._pending:
            self._start_batch()
        tickets = batch.tickets
        for journal, fut in tickets.items():
            if not fut.done():
                err = errors.get(journal) if errors else None
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
        if self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # ---- periodic ------------------------------------------------------------------------
    def arm(self, journal: QueueJournal, period: float) -> asyncio.TimerHandle:
        """Sync ``journal`` after ``period`` seconds (its first unsynced append arms this)."""
        return self.loop.call_later(period, self._periodic, journal)

    def _periodic(self, journal: QueueJournal) -> None:
        journal.timer_fired()
        targets = journal.take_dirty()
        if targets.empty:
            return
        fut = self.loop.run_in_executor(self._executor, journal.sync_work, targets)
        fut.add_done_callback(lambda done: self._periodic_done(done, journal, targets))

    def _periodic_done(
        self, done: asyncio.Future, journal: QueueJournal, targets: SyncWork
    ) -> None:
        exc = done.exception()
        if exc is not None:
            log.warning("periodic fsync of %s failed: %s", journal.directory, exc)
            journal.restore_dirty(targets)

    # ---- shutdown ------------------------------------------------------------------------
    async def drain(self) -> None:
        """Finish the batches in flight, then sync every registered journal."""
        while self._running is not None or self._pending:
            if self._running is None:
                self._start_batch()
                if self._running is None:  # closed meanwhile: close() answered the tickets
                    break
            waiter = self.loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        work = [(journal, journal.take_dirty()) for journal in list(self._journals)]
        if self._closed or not work:
            return
        errors = await self.loop.run_in_executor(self._executor, _sync_all, work)
        for journal, exc in errors.items():
            log.error("final fsync of %s failed: %s", journal.directory, exc)

    def close(self) -> None:
        """Answer the batch in flight (once its fsync ends), sync every registered journal
        in this thread, and stop the fsync thread and the executor."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop_thread()
            self._thread.join()  # after the batch in flight, if any: answer it now
            if self._running is not None:
                self._batch_done(self._running)
        for journal in list(self._journals):
            try:
                journal.sync()
            except JournalError as exc:
                log.error("final fsync of %s failed: %s", journal.directory, exc)
        self._executor.shutdown(wait=True)
        pending, self._pending = self._pending, {}
        for journal, fut in pending.items():
            if not fut.done():
                self._sync_now(journal, fut)
