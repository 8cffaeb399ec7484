"""Group commit: one fsync job, on a dedicated thread, for every journal written in a loop
iteration.

A journal with ``fsync = "always"`` asks for a ticket after each append. The first ticket of
an iteration schedules a batch with ``call_soon``; it runs after every callback of the
iteration (so every append made meanwhile joins it) and takes the dirty segments of all
journals in the batch. On the loop thread it duplicates each segment's descriptor (a segment
closed meanwhile cannot turn the number into another file) and opens each new directory, and
it hands those descriptors to an :class:`~erq.journal.fsync_worker.FsyncWorker`: a thread that
never takes the GIL in the C build, and that signals a finished job through a descriptor the
loop watches with ``add_reader``. The loop never waits for a disk. Appends that arrive while a
batch is syncing wait for the next batch. When the worker's descriptor turns readable, the
loop resolves this batch's tickets and starts the next batch once it has read its sockets
again, so that the clients just answered can join it (see ``_start_after_next_pass``).

A :class:`Ticket` is shared by the appends of one journal in one batch. It resolves after the
sync, or fails with JournalError (the data stays pending, and the next sync writes it again
before it syncs: see ``Segment``). The end of a batch settles all of its tickets first, then
calls the callbacks waiting on them (the sessions holding replies) right there, in the order
they registered: no task, future or ``call_soon`` per waiter. Batches finish in the order
they started, so when a ticket is done, every ticket taken before it is too.

Where fdatasync does not cover the mapped pages (not Linux), a segment needs ``msync`` before
its ``fsync``, which takes the mapping, not a descriptor: there each batch runs
``QueueJournal.sync_work`` in the executor instead, and posts its end back to the loop. So
does every batch after the worker failed to start (no descriptor or thread left).

A journal with a period arms a timer at its first unsynced append; the timer syncs it in the
executor, and checks that its current segment was not deleted meanwhile (``check_current``).
Appends never wait for that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..journal_api import JournalError
from ..startsignals import block_in_this_thread
from . import codec, fsync_worker
from .segment import _FDATASYNC_COVERS_MMAP

if TYPE_CHECKING:
    from .codec import Ticket
    from .journal import QueueJournal, SyncWork

log = logging.getLogger("erq.journal")

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


def _sync_failed(journal: QueueJournal, error: BaseException) -> None:
    """Log a journal's failed sync, periodic or a group commit's: the first of a streak (each
    is retried, every period or with the next write, until one works; the stat
    journal_sync_errors counts them all), so that a failing disk writes one line, not one a
    write."""
    journal.sync_failures_in_a_row += 1
    if journal.sync_failures_in_a_row == 1:
        log.warning(
            "fsync of %s failed: %s (retried until it works, which is logged)",
            journal.directory,
            error,
        )


def _sync_works_again(journal: QueueJournal) -> None:
    log.warning(
        "fsync of %s works again, after %d failed",
        journal.directory,
        journal.sync_failures_in_a_row,
    )
    journal.sync_failures_in_a_row = 0


def _sync_all(work: list[tuple[QueueJournal, SyncWork]]) -> dict[QueueJournal, JournalError]:
    """Executor side of a batch: sync every journal's segments, collect the failures."""
    errors = {}
    for journal, targets in work:
        try:
            journal.sync_work(targets)
        except JournalError as exc:
            errors[journal] = exc
    return errors


def _run_logged(work: Callable[[], object]) -> None:
    try:
        work()
    except Exception:
        log.exception("background work failed")


class _Batch:
    """The tickets of one group fsync and what it syncs."""

    __slots__ = ("tickets", "work", "failed", "spans", "ndata", "segments", "future")

    def __init__(self, tickets: dict[QueueJournal, Ticket]) -> None:
        self.tickets = tickets
        self.work = [(journal, journal.take_dirty()) for journal in tickets]
        self.failed: dict[QueueJournal, JournalError] = {}  # before the sync: no descriptor
        self.spans: list[tuple[int, int, int, int]] = []  # per work item: its fds, its dirs
        self.ndata = 0  # data descriptors in the job (the directories follow them)
        self.segments: list = []  # the segment of each data descriptor, in job order
        self.future: concurrent.futures.Future | None = None  # the executor path's job


def _worker_ready(ref: weakref.ref) -> None:
    """add_reader callback; holds the GroupCommit weakly so a dropped one is collected."""
    commit = ref()
    if commit is not None:
        commit._worker_ready()


def _start_batch(ref: weakref.ref) -> None:
    """A deferred batch start; holds the GroupCommit weakly, as ``_worker_ready`` does."""
    commit = ref()
    if commit is not None:
        commit._start_batch()


def _stop_worker(loop: asyncio.AbstractEventLoop, worker) -> None:
    """Stop watching the worker, then stop it (it finishes the job in flight first)."""
    try:
        if not loop.is_closed():
            loop.remove_reader(worker.fileno())
    except (RuntimeError, ValueError, OSError):
        pass
    worker.close()


class GroupCommit:
    """One per server: batches fsyncs of ``always`` journals and runs periodic ones.

    ``use_worker``: sync batches on an FsyncWorker (default where fdatasync covers the mapped
    segments, i.e. Linux) rather than in the executor."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_workers: int = 4,
        use_worker: bool | None = None,
    ) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        # Periodic syncs and the final drain (and the batches where there is no worker).
        self._max_workers = max_workers
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers,
            thread_name_prefix="erq-fsync",
            initializer=block_in_this_thread,
        )
        self._housekeeping: ThreadPoolExecutor | None = None  # background(), started at need
        self._use_worker = _FDATASYNC_COVERS_MMAP if use_worker is None else use_worker
        self._worker = None  # FsyncWorker, started with the first batch
        self._stop_worker: weakref.finalize | None = None
        self._pending: dict[QueueJournal, Ticket] = {}
        self._running: _Batch | None = None  # the batch being synced
        self._idle_waiters: list[asyncio.Future] = []  # drain() waiting for _running to end
        self._scheduled = False
        self._journals: set[QueueJournal] = set()
        self._periodic_due: list[QueueJournal] = []  # timers fired in this pass of the loop
        self._closed = False
        self.batches = 0  # group fsync jobs started
        self._ref = weakref.ref(self)

    # ---- journals ------------------------------------------------------------------------
    def register(self, journal: QueueJournal) -> None:
        """From any thread (recovery opens journals on a worker thread): a set add, atomic
        under the GIL; the loop reads the set only in ``drain`` and ``close``."""
        self._journals.add(journal)

    def unregister(self, journal: QueueJournal) -> None:
        self._journals.discard(journal)

    def ticket(self, journal: QueueJournal) -> Ticket:
        """A ticket that resolves once ``journal``'s appends so far are on disk."""
        ticket = self._pending.get(journal)
        if ticket is None:
            ticket = codec.Ticket()  # the codec's: the compiled journal and session type it
            if self._closed:
                self._sync_now(journal, ticket)
                return ticket
            self._pending[journal] = ticket
            journal._ticket = ticket  # the journal's next appends join it without this call
            if not self._scheduled and self._running is None:
                self._scheduled = True
                self.loop.call_soon(self._start_batch)
        return ticket

    def _sync_now(self, journal: QueueJournal, ticket: Ticket) -> None:
        try:
            journal.sync()
        except JournalError as exc:
            ticket.resolve(exc)
        else:
            ticket.resolve(None)

    def _start_batch(self) -> None:
        self._scheduled = False
        if self._running is not None or not self._pending or self._closed:
            return
        for journal in self._pending:
            journal._ticket = None  # appends from now on wait for the next batch
        batch = _Batch(self._pending)
        self._pending = {}
        self._running = batch
        self.batches += 1
        # The worker only syncs descriptors; data to be written again first (an earlier sync
        # failed) goes to the executor, whose sync writes it.
        redo = any(targets.redo for _, targets in batch.work)
        if not redo and self._use_worker and (self._worker is not None or self._start_worker()):
            self._submit(batch)
        else:
            self._submit_to_executor(batch)

    # ---- the worker path -----------------------------------------------------------------
    def _submit(self, batch: _Batch) -> None:
        """Turn the batch's work into descriptors, on the loop thread, and start the job."""
        worker = self._worker
        fds: list[int] = []
        dirs: list[int] = []
        spans = batch.spans
        for journal, targets in batch.work:
            first_fd, first_dir = len(fds), len(dirs)
            try:
                for segment in targets.segments:
                    if not segment.closed:  # closed segments are gone: nothing to sync
                        fds.append(os.dup(segment.fileno()))
                        batch.segments.append(segment)
                for directory in targets.directories:
                    try:
                        dirs.append(os.open(directory, _DIR_FLAGS))
                    except FileNotFoundError:  # deleted: nothing of it to keep (files_lost)
                        pass
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # No descriptor for a copy: the executor syncs each segment through its
                    # own descriptor, and needs none more but a directory's for a moment.
                    for fd in fds + dirs:
                        os.close(fd)
                    del batch.segments[:], spans[:]
                    batch.failed.clear()
                    self._submit_to_executor(batch)
                    return
                batch.failed[journal] = JournalError(
                    f"fsync of {journal.directory} failed: {exc.strerror or exc}"
                )
            spans.append((first_fd, len(fds), first_dir, len(dirs)))
        batch.ndata = len(fds)
        try:
            worker.submit(fds, dirs)
        except Exception as exc:  # a bug (the worker is idle here), but never answer OK
            for fd in fds + dirs:
                os.close(fd)
            error = JournalError(f"fsync failed: {exc}")
            batch.failed = {journal: error for journal, _ in batch.work}
            batch.spans = []
            self.loop.call_soon(self._batch_done, batch, batch.failed)

    def _start_worker(self) -> bool:
        """Start the worker and watch it; where that fails (no descriptor or thread left),
        say so and sync in the executor from now on."""
        try:
            worker = fsync_worker.FsyncWorker()
        except (OSError, MemoryError) as exc:
            log.error("cannot start the fsync worker (%s): group commits use the executor", exc)
            self._use_worker = False
            return False
        try:
            self.loop.add_reader(worker.fileno(), _worker_ready, self._ref)
        except BaseException:
            worker.close()
            raise
        self._worker = worker
        self._stop_worker = weakref.finalize(self, _stop_worker, self.loop, worker)
        return True

    def _worker_ready(self) -> None:
        batch = self._running
        if batch is None or self._worker is None:
            return
        errnos = self._worker.collect()
        if errnos is not None:
            self._batch_done(batch, self._worker_errors(batch, errnos))

    @staticmethod
    def _worker_errors(batch: _Batch, errnos: list[int]) -> dict[QueueJournal, JournalError]:
        errors = batch.failed
        if not any(errnos):
            return errors
        errors = dict(errors)
        ndata = batch.ndata
        segments = batch.segments
        for (journal, _), (f0, f1, d0, d1) in zip(batch.work, batch.spans, strict=True):
            if journal in errors:
                continue
            for index in (*range(f0, f1), *range(ndata + d0, ndata + d1)):
                err = errnos[index]
                if err == errno.ENOENT and (
                    journal.superseded(segments[index]) if index < ndata else journal.closed
                ):
                    # Deleted, but by erq: a segment released or replaced while it synced (its
                    # records were consumed, or are in the snapshot that replaced it, which a
                    # compaction deletes it after).
                    continue
                if err:
                    errors[journal] = JournalError(
                        f"fsync of {journal.directory} failed: {os.strerror(err)}"
                    )
                    break
        return errors

    # ---- the executor path ---------------------------------------------------------------
    def _submit_to_executor(self, batch: _Batch) -> None:
        batch.future = future = self._executor.submit(_sync_all, batch.work)
        loop = self.loop

        def post(_: concurrent.futures.Future) -> None:  # on the executor thread
            try:
                loop.call_soon_threadsafe(self._executor_done, batch)
            except RuntimeError:  # the loop is closed: nobody waits for these tickets any more
                pass

        future.add_done_callback(post)

    def _executor_done(self, batch: _Batch) -> None:
        if batch is self._running:
            self._batch_done(batch, self._executor_errors(batch))

    @staticmethod
    def _executor_errors(batch: _Batch) -> dict[QueueJournal, JournalError]:
        try:
            return batch.future.result()
        except Exception as exc:  # not a JournalError: a bug, but the tickets must not hang
            error = JournalError(f"fsync failed: {exc}")
            return {journal: error for journal, _ in batch.work}

    # ---- the end of a batch --------------------------------------------------------------
    def _batch_done(self, batch: _Batch, errors: dict[QueueJournal, JournalError]) -> None:
        """On the loop, once per synced batch: hand what failed back to its journals (the
        next sync retries it), answer this batch's tickets, and start the next batch after
        the loop's next pass over its sockets (see _start_after_next_pass)."""
        if batch is not self._running:
            return  # close() answered it already
        self._running = None
        for journal, targets in batch.work:
            error = errors.get(journal) if errors else None
            if error is not None:
                journal.restore_dirty(targets)
                journal.check_current()  # deleted under the server? heal it now
                _sync_failed(journal, error)
            else:
                targets.synced()
                if journal.sync_failures_in_a_row:
                    _sync_works_again(journal)
        if not self._closed:
            self._start_after_next_pass()
        # Settle every ticket of the batch before calling any waiter: a session waits only
        # for its latest ticket, and the replies it then sends may depend on earlier tickets
        # of the same batch (other journals).
        tickets = batch.tickets
        for journal, ticket in tickets.items():
            ticket.done = True
            if errors:
                ticket.error = errors.get(journal)
        for ticket in tickets.values():
            ticket.notify()
        if self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _start_after_next_pass(self) -> None:
        """Start the next batch two ``call_soon`` hops from now, which on either loop is
        after it has read its sockets once more.

        The clients this batch answers write again within a round trip. Started at once, the
        next batch would hold only the writes that waited during this sync, and the answered
        clients would wait for the whole of it before their writes could join the one after:
        the clients split into two cohorts that take turns, each waiting for two fsyncs per
        write. Waiting for one more pass merges them into one batch, for one fsync per write
        and fewer, larger batches (with 50 writers on the benchmark machine: batches of ~40
        instead of ~23, and ~25% more writes per second). The cost is one loop iteration
        for the writes that waited during the sync."""
        self._scheduled = True
        loop = self.loop
        loop.call_soon(loop.call_soon, _start_batch, self._ref)

    # ---- periodic ------------------------------------------------------------------------
    def arm(self, journal: QueueJournal, period: float) -> asyncio.TimerHandle:
        """Sync ``journal`` after ``period`` seconds (its first unsynced append arms this)."""
        return self.loop.call_later(period, self._periodic, journal)

    def _periodic(self, journal: QueueJournal) -> None:
        journal.timer_fired()
        due = self._periodic_due
        due.append(journal)
        if len(due) == 1:
            self.loop.call_soon(self._sync_periodic_due)
        journal.check_current()  # one fstat a period: were its files deleted under it?

    def _sync_periodic_due(self) -> None:
        """The periodic syncs whose timers fired in one pass of the loop go to the executor as
        one job per thread, not one job each: thousands of queues written within one period
        (a set to each, a flush_all) made a submit each, and the loop, contending with the
        sync threads for the GIL, stalled for 0.4-1.2 s (4,096-9,000 queues)."""
        due, self._periodic_due = self._periodic_due, []
        if self._closed:
            return  # close() synced every journal
        work = []
        for journal in due:
            targets = journal.take_dirty()
            if not targets.empty:
                work.append((journal, targets))
        if not work:
            return
        size = -(-len(work) // self._max_workers)
        for start in range(0, len(work), size):
            chunk = work[start : start + size]
            fut = self.loop.run_in_executor(self._executor, _sync_all, chunk)
            fut.add_done_callback(lambda done, chunk=chunk: self._periodic_done(done, chunk))

    def _periodic_done(
        self, done: asyncio.Future, work: list[tuple[QueueJournal, SyncWork]]
    ) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        errors = done.result() if exc is None else dict.fromkeys((j for j, _ in work), exc)
        for journal, targets in work:
            error = errors.get(journal)
            if error is not None:
                _sync_failed(journal, error)
                journal.restore_dirty(targets)
            elif journal.sync_failures_in_a_row:
                _sync_works_again(journal)

    # ---- other work off the loop ------------------------------------------------------------
    def background(self, work: Callable[[], object]) -> None:
        """Run ``work`` on a thread of its own (a queue's directory being removed, say), in
        the order given; its failure is logged. Not on the executor: a burst of deletes there
        would hold the periodic fsyncs back. After close, here and now; ``close`` waits for
        what is under way."""
        if self._closed:
            _run_logged(work)
            return
        if self._housekeeping is None:
            self._housekeeping = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="erq-bg", initializer=block_in_this_thread
            )
        self._housekeeping.submit(_run_logged, work)

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
        for journal, targets in work:
            exc = errors.get(journal)
            if exc is not None:  # close() syncs it once more, writing it again first
                log.error("%s (at shutdown; trying once more)", exc)
                journal.restore_dirty(targets)

    def close(self) -> None:
        """Answer the batch in flight (once its fsync ends), sync every registered journal
        in this thread, and stop the worker and the executor."""
        if self._closed:
            return
        self._closed = True
        batch = self._running
        if batch is not None:
            if batch.future is not None:
                concurrent.futures.wait([batch.future])
                errors = self._executor_errors(batch)
            else:
                errnos = self._worker.collect(wait=True)
                if errnos is None:  # cannot happen: the job was submitted
                    error = JournalError("fsync did not run")
                    errors = {journal: error for journal, _ in batch.work}
                else:
                    errors = self._worker_errors(batch, errnos)
            self._batch_done(batch, errors)
        if self._stop_worker is not None:
            self._stop_worker()
            self._worker = None
        for journal in list(self._journals):
            try:
                journal.sync()
            except JournalError as exc:
                log.error("%s (at shutdown)", exc)
        self._executor.shutdown(wait=True)
        if self._housekeeping is not None:
            self._housekeeping.shutdown(wait=True)
        pending, self._pending = self._pending, {}
        for journal, ticket in pending.items():
            journal._ticket = None
            self._sync_now(journal, ticket)
