"""Reclaiming: how a journal gives its disk space back.

Two ways: ``release_head`` deletes the oldest segments once the queue's head has passed them
(a long queue that drains gives back its files as it goes), and compaction rewrites the live
records into a snapshot when what is left is mostly history (the snapshot is written on a
thread by :class:`~erq.journal.compaction.SnapshotJob`; here is when to start one and how its
result is swapped in). Part of :class:`QueueJournal`, whose segments and counts it reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from ..datadir import fsync_directory
from ..journal_api import JournalError
from .compaction import CompactionAborted, SnapshotJob
from .format import ADD_OVERHEAD, HEADER_FLAG_AFTER_SNAPSHOT, HEADER_SIZE
from .segment import INITIAL_SEGMENT_SIZE, Segment

log = logging.getLogger("erq.journal")

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # compaction back-off after a failure, seconds
# An empty queue that has written nothing for this long gives back a segment larger than the
# first size and its spare (up to two files of the segment size, 128 MiB by default).
IDLE_SHRINK_SECONDS = 30.0


class Reclaiming:
    """QueueJournal's part that frees disk space (a mixin: the state is the journal's)."""

    __slots__ = ()

    def _init_reclaiming(self) -> None:
        self._needs_rewrite = False  # damaged records seen: the next compaction rewrites
        self._no_compaction_at: tuple | None = None  # wants_compaction's state when it said no
        self._idle_mark: tuple | None = None  # (writer, position) last seen by _idle_oversized
        self._idle_since = 0.0  # when _idle_mark was first seen
        self._job: SnapshotJob | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self.rewrites = 0  # compactions completed
        self.released = 0  # old segments deleted by release_head
        self.last_compaction_error: BaseException | None = None

    def _live_bytes(self) -> int:
        """Record bytes of the live items: exact for those on disk, estimated for the rest."""
        disk = self._disk
        rest = self.live_items - disk.count
        c = self._cumulative()
        mean = c[1] // c[0] if c[0] else ADD_OVERHEAD
        return disk.nbytes + disk.count * ADD_OVERHEAD + max(rest, 0) * mean

    @property
    def wants_compaction(self) -> bool:
        """True when :meth:`compact` would free space: the queue drained and old segments
        remain, or the journal outgrew twice its live data, or it outgrew
        ``max_journal_size`` while its live data fits in that size (Kestrel's rule: a rewrite
        copies the live data, so a queue longer than the limit is not rewritten for it; a
        draining one would copy what its consumers are about to remove)."""
        if self._job is not None:
            self._poll_compaction()
            if self._job is not None:
                return False
        if self._closed or not self._segments or time.monotonic() < self._retry_at:
            return False
        if self._idle_oversized():  # before the shortcut below: idleness is all it waits for
            return True
        # The sweep asks every queue every second; most have written nothing since.
        writer = self._writer
        now = (writer, writer.position, len(self._segments), self._max_journal_size)
        if now == self._no_compaction_at:
            return False
        wanted = self._compaction_pays()
        self._no_compaction_at = None if wanted else now
        return wanted

    def _compaction_pays(self) -> bool:
        if self.live_items == 0:
            return len(self._segments) > 1 or self._current_needs_rotation(self._needs_rewrite)
        used = self.used_bytes
        if self._needs_rewrite:
            return True
        live = self._live_bytes()
        cap = self._segment_cap
        if used > max(2 * live, cap):
            return True
        limit = self._max_journal_size
        return used > limit and live < limit and used - live > cap

    # ---- compaction ------------------------------------------------------------------------
    def compact(self, open_items: Sequence, memory_items: Sequence, *, wait: bool = False) -> None:
        """Rewrite the journal as a snapshot of the live state.

        ``open_items``: the open reads in their original order; ``memory_items``: the items in
        RAM in queue order (objects with id, flags, add_time, expiry, data, like
        RecoveredItem). The not-in-memory items are the journal's own. An empty queue is
        compacted at once by deleting the old segments; otherwise the snapshot is written on
        a thread (``wait=True`` waits for it) while appends go on in a fresh segment.
        Failures are logged and retried later with a back-off; compaction never raises.
        """
        self._poll_compaction()
        if self._job is not None or self._closed or self._lost:
            return
        open_items = list(open_items)
        memory_items = list(memory_items)
        rewrite, self._needs_rewrite = self._needs_rewrite, False
        if not open_items and not memory_items and not self._disk.count:
            self._drop_history(rewrite)
            return
        try:
            self._start_snapshot(open_items, memory_items)
        except JournalError as exc:
            self._compaction_failed(exc)
            return
        if wait:
            self.wait_compaction()

    def _steady_size(self) -> int:
        """The size of the segment a compaction starts for the appends: the current one's,
        within the cap (one made larger for a single big record does not pass it on)."""
        return min(self._segments[-1].size, self._segment_cap)

    def _start_snapshot(self, open_items: list, memory_items: list) -> SnapshotJob:
        """Rotate (appends go on in a fresh segment), then write the live state as a snapshot
        of every older segment, on a thread. JournalError if the rotation fails."""
        snapshot_seq = self._next_seq
        self._next_seq += 1
        # Its header tells recovery that the number before it may never be written.
        size = self._steady_size() if self._segments else None
        try:
            self._rotate(0, size, HEADER_FLAG_AFTER_SNAPSHOT)
        except JournalError:
            # No segment says the number may stay unused: the next one made takes it.
            self._next_seq = snapshot_seq
            raise
        old = self._segments[:-1]
        self._reset_counts(len(open_items) + len(memory_items) + self._disk.count, len(open_items))
        job = SnapshotJob(
            self.directory,
            snapshot_seq,
            self._id_floor_now(),
            open_items,
            memory_items,
            self._disk.runs(),
            old,
            self._wake_loop,
        )
        self._job = job
        job.start()
        return job

    def pack(self, memory_items: Sequence) -> int:
        """Offline (``erq journal pack``): rewrite the journal as one snapshot of its live
        state, then close it; returns the record bytes left (headers included, as
        ``used_bytes``). ``memory_items``: the recovered items in RAM, in queue order (the
        not-in-memory ones are the journal's own). Nothing may be open: recovery put the
        reads open at the crash back at the head.

        The snapshot is the only file afterwards and holds only the live items' ADDs (no
        history; a drained queue keeps a header, which carries its next id), and no room
        after them: the next start's first append starts a segment as a rotation does (of the
        first size for a drained queue, at most the segment size after a large snapshot), so
        the snapshot never takes appends, nor lends its size to a compaction's rotation, and
        it is released once its items are gone. Crash-safe as compaction is (write, fsync,
        rename, fsync the directory, delete the old segments): at any point a start reads
        either the old segments or the snapshot. A journal already in that shape is left as
        it is. Raises JournalError if the snapshot could not be made (the old segments
        stay); ``last_compaction_error`` says so when it was made but the old segments may
        not all be gone."""
        try:
            self._poll_compaction()
            if self._job is not None or self._closed or self._lost:
                raise JournalError(f"the journal in {self.directory} cannot be packed now")
            if not self._segments and self._next_seq == 1:
                return 0  # nothing was ever written
            # Every segment lost or set aside: the snapshot is a drained queue's header, and
            # the range names it, not the files that are gone (reported by the recovery).
            items = list(memory_items)
            live = self._disk.nbytes + self._disk.count * ADD_OVERHEAD
            live += sum(len(item.data) + ADD_OVERHEAD for item in items)
            used = self.used_bytes
            if (
                len(self._segments) == 1
                and not self._needs_rewrite
                and used == HEADER_SIZE + live  # nothing but live ADDs: queue order
                and self._segments[0].size == used  # and no room after them
            ):
                return used
            self._seal_current()
            old = list(self._segments)
            job = SnapshotJob(
                self.directory,
                self._next_seq,
                self._id_floor_now(),
                (),
                items,
                self._disk.runs(),
                old,
            )
            self._next_seq += 1
            job.run()  # on this thread: nothing else goes on meanwhile
            error = job.error
            if error is not None and not isinstance(error, Exception):
                raise error  # Ctrl-C, say: the old segments (or the snapshot) hold it all
            if error is not None or job.segment is None:
                raise JournalError(f"cannot pack {self.directory}: {error}") from error
            job.segment.close()
            self._forget(old)  # deleted (or superseded): no sync of theirs is due
            for segment in old:
                segment.close()
            if any(os.path.lexists(segment.path) for segment in old):
                # The directory sync or an unlink failed (logged): the snapshot is in place,
                # the old segments are superseded, and the next start deletes them.
                self.last_compaction_error = JournalError(
                    f"{self.directory}: packed, but the old segments are still there (the "
                    "next start deletes them)"
                )
                return job.size
            # The snapshot is the whole journal now: the range states it alone (segrange.py;
            # until this rename the snapshot's flag says where the journal starts).
            self._set_range(job.segment.seq, job.segment.seq)
            try:
                fsync_directory(self.directory)  # the deletions and the range's rename
            except OSError as exc:
                self.last_compaction_error = JournalError(
                    f"{self.directory}: packed, but the deletion of the old segments may not "
                    f"be durable yet (fsync of the directory failed: {exc})"
                )
            return job.size
        finally:
            self.close()

    def wait_compaction(self) -> None:
        """Block until a running compaction has ended and been swapped in."""
        job = self._job
        if job is not None:
            job.join()
            self._poll_compaction()

    def _current_needs_rotation(self, rewrite: bool) -> bool:
        """An empty queue's current segment is worth replacing: half full of history, or
        holding damaged records."""
        if self._writer is self._null_writer:
            return False
        used = self._writer.position
        return used > self._segment_cap // 2 or (rewrite and used > HEADER_SIZE)

    def _idle_oversized(self) -> bool:
        """The queue is empty, has written nothing for IDLE_SHRINK_SECONDS, and holds more
        disk than an idle queue needs: a segment past the first size, or a spare. (A queue
        that is only empty for a moment keeps them: it would grow them again at once.)"""
        writer = self._writer
        if writer is self._null_writer or (
            self._segments[-1].size <= INITIAL_SEGMENT_SIZE and self._spare is None
        ):
            return False
        mark = (writer, writer.position)
        now = time.monotonic()
        if mark != self._idle_mark:
            self._idle_mark, self._idle_since = mark, now
            return False
        return now - self._idle_since >= IDLE_SHRINK_SECONDS and self.live_items == 0

    def _drop_history(self, rewrite: bool) -> None:
        """The queue is empty: every record before now is history. Deleting any prefix of the
        segments then leaves a log that replays to the same (empty) state, so the old
        segments go at once, oldest first."""
        if not self._segments:
            return
        shrink = self._idle_oversized()
        if shrink or self._current_needs_rotation(rewrite):
            size = self._steady_size()
            if shrink:  # start again from the first size, as a new queue does
                self._drop_spare()
                size = self._next_size = min(INITIAL_SEGMENT_SIZE, self._segment_size)
            try:
                self._rotate(0, size)
            except JournalError as exc:
                self._compaction_failed(exc)
                return
        old = self._segments[:-1]
        if not old:
            return
        self._delete_oldest(old)
        self._reset_counts(0, 0)
        self.rewrites += 1
        self._retry_delay = RETRY_FIRST

    def release_head(self, lowest_live_id: int | None) -> int:
        """Delete the oldest sealed segments that no live item needs; returns how many.

        ``lowest_live_id``: no item queued in RAM or open has a lower id (None: there is no
        such item). A segment header's ``id_floor`` is greater than every id added in the
        segments before it, so those hold no live item's ADD once the floor is at most
        ``lowest_live_id`` and none of the not-in-memory items is in them. What they still
        hold is history: replay ignores the records that name ids it never saw, so deleting
        that prefix of the log (oldest first) leaves a log that replays to the same state,
        at every step. A long queue whose head is draining gives its disk back as it goes,
        without a snapshot (Kestrel's journal likewise drops the files its reader passed).
        """
        self._poll_compaction()
        segments = self._segments
        if self._job is not None or self._closed or len(segments) < 2:
            return 0
        pinned = self._disk.segments()
        n = 0
        while n < len(segments) - 1 and segments[n] not in pinned:
            if lowest_live_id is not None and segments[n + 1].id_floor > lowest_live_id:
                break
            n += 1
        if not n:
            return 0
        self._delete_oldest(segments[:n])
        self.released += n
        return n

    def _delete_oldest(self, old: list[Segment]) -> None:
        """Delete ``old``, the oldest segments, oldest first: a crash between two unlinks
        leaves a shorter prefix deleted, which replays to the same state. The range starts
        after them first (segrange.py); if it cannot, they stay on disk (replayed at the
        next start, harmlessly) rather than be taken for lost."""
        self._forget(old)
        moved = self._set_range(self._segments[0].seq, self._range_last())
        for segment in old:
            segment.close()
            if not moved:
                continue
            try:
                os.unlink(segment.path)
            except FileNotFoundError:
                pass
        if self.directory not in self._dirs_unsynced:
            self._dirs_unsynced.append(self.directory)  # the unlinks, with the next sync

    def _range_last(self) -> int:
        """The last number the range states (the newest segment's, unless it is not written)."""
        stated = self._range.last if self._range is not None else 0
        return max(stated, self._segments[-1].seq)

    def _forget(self, old: list[Segment]) -> None:
        gone = set(old)
        self._segments = [segment for segment in self._segments if segment not in gone]
        self._unsynced = [segment for segment in self._unsynced if segment not in gone]
        self._sealed_used = sum(segment.used for segment in self._segments[:-1])

    def _wake_loop(self) -> None:
        """Called on the compaction thread when it ends: finish on the loop thread soon."""
        commit = self._commit
        if commit is not None:
            try:
                commit.loop.call_soon_threadsafe(self._poll_compaction)
            except RuntimeError:  # loop closed: the next journal call finishes instead
                pass

    def _poll_compaction(self) -> None:
        job = self._job
        if job is None or not job.done.is_set():
            return
        self._job = None
        healing = job is self._heal_job
        self._heal_job = None
        if job.error is not None or job.segment is None:
            if healing:
                self._heal_failed(job.error or JournalError("the rewrite did not finish"))
            else:
                self._compaction_failed(job.error)
            return
        old = job.old_segments
        self._disk.replace_head(set(old), job.segment, job.offsets)
        job.segment.used = job.size
        self._forget(old)
        self._segments.insert(0, job.segment)
        self._sealed_used += job.segment.used
        # The job deleted the old segments already: until now the snapshot's flag said where
        # the journal starts.
        self._set_range(job.segment.seq, self._range_last())
        for segment in old:
            segment.close()
        self.rewrites += 1
        self._retry_delay = RETRY_FIRST
        if healing:
            self._healed()

    def _compaction_failed(self, exc: BaseException | None) -> None:
        if isinstance(exc, CompactionAborted):
            return  # stopped by erq (close, delete, heal): no failure, nothing to say
        self.last_compaction_error = exc
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        if exc is not None and not self._closed and not self._lost:  # heal() says what matters
            log.warning(
                "compaction of %s failed (retry in %.0fs): %s",
                self.directory,
                self._retry_at - time.monotonic(),
                exc,
            )

    def _stop_compaction(self) -> None:
        job = self._job
        if job is not None:
            job.abort()
            job.join()
            self._poll_compaction()
