"""Group commit: one fsync job, in a thread, for every journal written in a loop iteration.

A journal with ``fsync = "always"`` asks for a ticket after each append. The first ticket of
an iteration schedules a batch with ``call_soon``; it runs after every callback of the
iteration (so every append made meanwhile joins it), takes the dirty segments of all
journals in the batch and fdatasyncs them in the executor: the loop never waits for a disk.
Appends that arrive while a batch is syncing wait for the next batch, which starts as soon
as the running one ends. A ticket is an asyncio Future shared by the appends of one journal
in one batch; it resolves after the sync, or fails with JournalError.

A journal with a period arms a timer at its first unsynced append; the timer syncs it in the
executor. Appends never wait for that.
"""

from __future__ import annotations

import asyncio
import logging
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


class GroupCommit:
    """One per server: batches fsyncs of ``always`` journals and runs periodic ones."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None = None, *, max_workers: int = 4
    ) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="erq-fsync")
        self._pending: dict[QueueJournal, asyncio.Future] = {}
        self._running: asyncio.Future | None = None
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
        if self._running is not None or not self._pending:
            return
        batch, self._pending = self._pending, {}
        work = [(journal, journal.take_dirty()) for journal in batch]
        self.batches += 1
        running = self.loop.run_in_executor(self._executor, _sync_all, work)
        self._running = running
        running.add_done_callback(lambda done: self._batch_done(done, batch, work))

    def _batch_done(self, done: asyncio.Future, batch: dict, work: list) -> None:
        self._running = None
        try:
            errors = done.result()
        except Exception as exc:  # the executor itself failed
            errors = {journal: JournalError(f"fsync failed: {exc}") for journal in batch}
        for journal, targets in work:
            fut = batch[journal]
            err = errors.get(journal)
            if err is not None:
                journal.restore_dirty(targets)
                if not fut.done():
                    fut.set_exception(err)
            elif not fut.done():
                fut.set_result(None)
        if self._pending:
            self._start_batch()

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
            running = self._running
            if running is not None:
                await asyncio.wait({running})
                await asyncio.sleep(0)  # let _batch_done run
        work = [(journal, journal.take_dirty()) for journal in list(self._journals)]
        if self._closed or not work:
            return
        errors = await self.loop.run_in_executor(self._executor, _sync_all, work)
        for journal, exc in errors.items():
            log.error("final fsync of %s failed: %s", journal.directory, exc)

    def close(self) -> None:
        """Final sync of every registered journal (in this thread), then stop the executor."""
        if self._closed:
            return
        self._closed = True
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
