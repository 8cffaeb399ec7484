"""QueueJournal: one queue's durable log (appends, fsync policy, read-behind, compaction).

Writes go into the current segment's shared mapping (one memcpy in the codec; a large record
goes in with one pwritev on the segment's file instead, which spares the kernel zero-filling
pages that are about to be overwritten), so once an append returns the record is in the
kernel's page cache: killing the process loses nothing.
The fsync policy decides when it reaches the disk (see ``commit.py``).

Disk space comes back two ways: ``release_head`` deletes the oldest segments once the queue's
head has passed them (a long queue that drains gives back its files as it goes), and
compaction rewrites the live records into a snapshot when what is left is mostly history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from ..datadir import fsync_directory, remove_queue_dir
from ..journal_api import JournalError
from . import codec
from .compaction import CompactionAborted, SnapshotJob
from .diskitems import DiskItems
from .format import (
    ADD_OVERHEAD,
    HEADER_SIZE,
    OP_FLUSH,
    OP_UNREMOVE,
)
from .recovery import RecoveredItem, Recovery, replay
from .segment import Segment, Spare, round_up

log = logging.getLogger("erq.journal")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
INITIAL_SEGMENT_SIZE = 64 * KiB
_ALWAYS, _PERIOD, _NEVER = "always", "period", "never"
_UNSET = object()
_RETRY_FIRST, _RETRY_MAX = 1.0, 60.0  # compaction back-off after a failure, seconds
_DIR_SETTLE = 0.5  # seconds an unchanged directory mtime must last before it is trusted
_HEAL_LOG_EVERY = 60.0  # a heal that keeps failing the same way is logged again after this long

# Segments from this size on get their successor allocated ahead (a spare): allocating 64 MiB
# on ext4 stalled the loop for ~20 ms, a small segment is quick to allocate, and a spare of a
# small, idle queue would only hold disk space.
SPARE_MIN_SIZE = 16 * MiB
_allocator: ThreadPoolExecutor | None = None
_allocator_lock = threading.Lock()


def _spare_allocator() -> ThreadPoolExecutor:
    """The one thread, shared by every journal, that allocates spare segment files."""
    global _allocator
    with _allocator_lock:
        if _allocator is None:
            _allocator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erq-allocate")
        return _allocator


class SyncWork:
    """Segments and directories with changes not yet on disk, taken for one sync."""

    __slots__ = ("segments", "directories")

    def __init__(self, segments: list[Segment], directories: list[Path]) -> None:
        self.segments = segments
        self.directories = directories

    @property
    def empty(self) -> bool:
        return not self.segments and not self.directories


def _parse_fsync(fsync: str | int) -> tuple[str, float]:
    # The modes are compared by identity on the append path: return the module's constants.
    if fsync == _ALWAYS:
        return _ALWAYS, 0.0
    if fsync == _NEVER:
        return _NEVER, 0.0
    if isinstance(fsync, int) and not isinstance(fsync, bool) and fsync > 0:
        return _PERIOD, fsync / 1000.0
    raise ValueError(f"fsync must be 'always', 'never' or a period in ms > 0, not {fsync!r}")


class _JournalType(type):
    """QueueJournal's metaclass. ``QueueJournal.open(directory, ...)`` opens a journal, while
    ``journal.open(id)`` journals an open read (AppendCore.open, the queue's API): one name,
    two meanings. A class attribute lookup sees this data descriptor before the class's own
    MRO, an instance lookup never sees it, so the instance call stays a plain C method."""

    @property
    def open(cls):
        return cls._open_journal


def _identity(directory: str | Path) -> tuple[int, ...] | None:
    """(device, inode) of ``directory``; None if it is gone, () if that cannot be told."""
    try:
        st = os.stat(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return ()
    return (st.st_dev, st.st_ino)


def _discard_spare(pending: Future) -> None:
    if not pending.cancelled() and pending.exception() is None:
        pending.result().discard()


class QueueJournal(codec.AppendCore, metaclass=_JournalType):
    """The journal of one queue: a directory of segments. Open it with :meth:`open`.

    The appends (``add``, ``remove``, ``open(id)``, ``confirm``, ``unremove``) are inherited
    from the codec's AppendCore (C in the fast build), which calls back into ``_rotate``,
    ``_written`` and ``_disk`` here only when a segment is full, the fsync policy has work, or
    an item stays on disk. (No zero-argument ``super()`` in this class: tests rebuild it over
    the other AppendCore implementation, see tests/test_journal_support.py.)
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: str | int,
        segment_size: int,
        max_memory_size: int,
        max_journal_size: int,
        commit,
    ) -> None:
        if segment_size < 4 * KiB:
            raise ValueError("segment_size must be at least 4 KiB")
        self.directory = directory
        self._mode, self._period = _parse_fsync(fsync)
        self._segment_size = round_up(segment_size)
        self._max_memory_size = max_memory_size
        self._max_journal_size = max_journal_size
        self._commit = commit
        self._segments: list[Segment] = []  # oldest first; the last one takes the appends
        # The writer of the last segment; with no segment (or once closed) a writer of an
        # empty buffer, which refuses every record, so appends never test for None.
        self._null_writer = codec.SegmentWriter(bytearray(0), 0)
        self._writer = self._null_writer
        self._next_seq = 1
        self._next_size = min(INITIAL_SEGMENT_SIZE, self._segment_size)
        self._id_floor = 1
        self._disk = DiskItems()
        self._sealed_used = 0  # record bytes in segments other than the current one
        # The writers count what they append (SegmentWriter.counters); these are the sums for
        # sealed segments. Live items (queued + open) and open reads follow from the counts
        # since the last reset (recovery, flush, compaction), which sets them exactly.
        self._totals = [0] * 8
        self._mark = (0,) * 8
        self._base_live = 0
        self._base_open = 0
        self._needs_rewrite = False
        self._no_compaction_at: tuple | None = None  # wants_compaction's state when it said no
        # Durability: the current segment is synced up to _synced_pos; sealed segments with
        # unsynced records wait in _unsynced. _quiet: an append needs no fsync bookkeeping
        # ("never", or a period whose timer is already armed).
        self._synced_pos = 0
        self._unsynced: list[Segment] = []
        self._dirs_unsynced: list[Path] = []  # a new segment's directory, a new directory's parent
        self._quiet = self._mode is _NEVER
        self._ticket = None  # "always": the pending batch's ticket (set by GroupCommit.ticket)
        self._timer: asyncio.TimerHandle | None = None
        self._next_sync_at = 0.0
        self._job: SnapshotJob | None = None
        # The next segment's file, allocated ahead on a worker thread (journals of a server,
        # which pass a commit, with segments of SPARE_MIN_SIZE or more; offline tools
        # allocate when they rotate).
        self._spare: Future | None = None
        self._spares = 0  # spare files made: their names
        self._retry_at = 0.0
        self._retry_delay = _RETRY_FIRST
        self._closed = False
        self.rotations = 0  # segments sealed because they were full or for a compaction
        self.rewrites = 0  # compactions completed
        self.released = 0  # old segments deleted by release_head
        self.last_compaction_error: BaseException | None = None
        # Files deleted under the server (see files_lost): the owner of the live state sets
        # on_lost, called on the loop when the fsync period's check finds them gone, or a
        # rotation finds their directory gone.
        self.on_lost: Callable[[], object] | None = None
        self._lost = False  # files gone, live state not yet written again
        self._refusing = False  # ... and no segment with a name to append to: appends fail
        self._heal_job: SnapshotJob | None = None
        self._heal_soon = False  # a failed rotation found the directory gone: on_lost is due
        self._heal_logged: tuple[str, float] = ("", 0.0)
        self._dir_path = os.fspath(directory)  # a str: os.stat converts a Path for ~4 us
        self._dir_id = _identity(self._dir_path)
        # The directory's mtime at the thorough checks (see _missing_path): first seen when,
        # and unchanged for long enough that its segments need no asking.
        self._dir_mtime: int | None = None
        self._dir_seen_at = 0.0
        self._dir_settled = False

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def _open_journal(
        cls,
        directory: str | os.PathLike,
        *,
        fsync: str | int = 100,
        segment_size: int = 64 * MiB,
        max_memory_size: int = 128 * MiB,
        max_journal_size: int = 1 * GiB,
        commit=None,
        item_overhead: int = 0,
    ) -> tuple[QueueJournal, Recovery]:
        """Open (creating the directory if missing) and replay a queue's journal.

        Recovery reads items into memory up to ``max_memory_size``, counting their data plus
        ``item_overhead`` bytes each (what the queue spends per item in RAM).

        Reads that were open at the crash are back at the head of ``Recovery.items``; an
        UNREMOVE is journaled for each, so the journal states the same order from now on.

        Safe on a thread other than the loop's (server start-up recovery): nothing here uses
        ``commit``'s loop; the fsync policy's timers and tickets start with the first append.
        """
        directory = Path(directory)
        created = not directory.is_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            journal = cls(
                directory,
                fsync=fsync,
                segment_size=segment_size,
                max_memory_size=max_memory_size,
                max_journal_size=max_journal_size,
                commit=commit,
            )
            result = replay(directory, max_memory_size, item_overhead)
        except OSError as exc:
            # Out of descriptors, disk full, no permission: a request that would create the
            # queue gets SERVER_ERROR, and a new queue's directory is not left behind.
            if created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise JournalError(f"cannot open the journal in {directory}: {exc}") from exc
        journal._adopt(result)
        if created:
            journal._dirs_unsynced.append(directory.parent)
        try:
            for id in reversed(result.open_ids):
                journal._append_op(OP_UNREMOVE, id)
        except JournalError as exc:
            # Not fatal: the journal still says "open", which the next start also puts back
            # at the head; only their order relative to later aborts may differ then.
            result.recovery.warnings.append(
                f"{directory}: could not journal the return of {len(result.open_ids)} open "
                f"read(s) to the head: {exc}"
            )
        if commit is not None:
            commit.register(journal)
        return journal, result.recovery

    def _adopt(self, result) -> None:
        segments = result.segments
        self._segments = segments
        self._next_seq = result.next_seq
        if segments:
            current = segments[-1]
            self._writer = codec.SegmentWriter(current.mm, current.used, True, current.fileno())
            self._sealed_used = sum(seg.used for seg in segments[:-1])
            self._next_size = max(self._next_size, min(self._segment_size, current.size * 2))
        recovery = result.recovery
        self._disk = result.disk
        live = len(recovery.items) + recovery.disk_items
        self._totals[0], self._totals[1] = live, result.live_record_bytes  # for the mean size
        self._reset_counts(live, 0)
        self._id_floor = recovery.next_id
        self._needs_rewrite = result.damaged

    # ---- appends ---------------------------------------------------------------------------
    # The hot path is AppendCore's: one call into the codec, which writes the record into the
    # mapped segment and counts it; bookkeeping only when the fsync policy needs some.

    def flush(self):
        """Every queued (not open) item is dropped, the not-in-memory ones included."""
        self._append_op(OP_FLUSH, 0)
        self._disk.clear()
        open_reads = self.open_reads
        self._reset_counts(open_reads, open_reads)
        if self._quiet:
            return None
        return self._written()

    def _written(self):
        """After an append, what the fsync policy asks for (a ticket, a timer, a sync)."""
        mode = self._mode
        if mode is _ALWAYS:
            if self._commit is not None:
                return self._commit.ticket(self)
            self.sync()
        elif mode is _PERIOD:
            if self._commit is not None:
                self._timer = self._commit.arm(self, self._period)
                self._quiet = True
            elif time.monotonic() >= self._next_sync_at:
                self.sync()
        return None

    def _rotate(self, record_size: int, size: int | None = None) -> codec.SegmentWriter:
        """Seal the current segment and start a new one with room for ``record_size`` bytes."""
        if self._closed:
            raise JournalError(f"journal {self.directory} is closed")
        if self._refusing:
            raise JournalError(
                f"the journal in {self.directory} was deleted and cannot be written again yet"
            )
        if size is None:
            size = self._next_size
        size = max(size, round_up(HEADER_SIZE + record_size))
        try:
            segment = Segment.create(
                self.directory,
                self._next_seq,
                size,
                id_floor=self._id_floor_now(),
                spare=self._take_spare(size),
            )
        except JournalError as exc:
            if isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
                self._directory_gone()
            raise
        self._next_seq += 1
        self._seal_current()
        self._segments.append(segment)
        self._writer = writer = codec.SegmentWriter(segment.mm, HEADER_SIZE, True, segment.fileno())
        self._synced_pos = 0  # the header too
        self._next_size = min(self._segment_size, max(self._next_size, size) * 2)
        if self.directory not in self._dirs_unsynced:
            self._dirs_unsynced.append(self.directory)
        if self._commit is not None and self._next_size >= SPARE_MIN_SIZE:
            self._spares += 1
            self._spare = _spare_allocator().submit(
                Spare.allocate, self.directory, self._spares, self._next_size
            )
        return writer

    def _take_spare(self, size: int) -> Spare | None:
        """The allocated spare if it is ready and big enough; never waits for one."""
        pending, self._spare = self._spare, None
        if pending is None:
            return None
        if not pending.done():
            pending.add_done_callback(_discard_spare)
            return None
        if pending.exception() is not None:  # a full disk, say: the rotation tries itself
            return None
        spare = pending.result()
        if spare.size < size:
            spare.discard()
            return None
        return spare

    def _seal_current(self) -> None:
        writer = self._writer
        if writer is self._null_writer:
            return
        current = self._segments[-1]
        current.used = writer.position
        totals = self._totals
        for i, n in enumerate(writer.counters()):
            totals[i] = max(totals[i], n) if i == 2 else totals[i] + n
        writer.release()
        current.drop_pages()  # what the writer had not trimmed yet
        self._writer = self._null_writer
        self._sealed_used += current.used
        if current.used > self._synced_pos:
            self._unsynced.append(current)
        self.rotations += 1

    # ---- counts ----------------------------------------------------------------------------
    def _cumulative(self) -> list[int]:
        """Counters of everything appended so far (layout of SegmentWriter.counters)."""
        out = list(self._totals)
        for i, n in enumerate(self._writer.counters()):
            out[i] = max(out[i], n) if i == 2 else out[i] + n
        return out

    def _reset_counts(self, live: int, open_reads: int) -> None:
        self._mark = tuple(self._cumulative())
        self._base_live = live
        self._base_open = open_reads

    @property
    def live_items(self) -> int:
        """Items queued or open, as journaled (exact while the queue names only its ids)."""
        c, m = self._cumulative(), self._mark
        return max(0, self._base_live + (c[0] - m[0]) - (c[3] - m[3]) - (c[5] - m[5]))

    @property
    def open_reads(self) -> int:
        c, m = self._cumulative(), self._mark
        return max(0, self._base_open + (c[4] - m[4]) - (c[5] - m[5]) - (c[6] - m[6]))

    def _id_floor_now(self) -> int:
        """Greater than every id journaled so far (for new segment headers)."""
        c = self._cumulative()
        return max(self._id_floor, c[2] + 1 if c[0] else 0)

    # ---- read-behind -----------------------------------------------------------------------
    def read_behind(self, max_bytes: int) -> list[RecoveredItem]:
        """The next not-in-memory items in FIFO order: as many as fit in ``max_bytes`` of
        data, and at least one if any remain."""
        self._poll_compaction()
        try:
            return self._disk.take(max_bytes, RecoveredItem)
        except ValueError as exc:
            raise JournalError(f"cannot read an item back: {exc}") from exc

    @property
    def disk_items(self) -> int:
        return self._disk.count

    @property
    def disk_bytes(self) -> int:
        return self._disk.nbytes

    # ---- policy and sizes ------------------------------------------------------------------
    def update_policy(
        self, *, fsync=_UNSET, max_memory_size=_UNSET, max_journal_size=_UNSET
    ) -> None:
        """Apply a reloaded configuration (takes effect at the next append)."""
        if fsync is not _UNSET:
            mode, period = _parse_fsync(fsync)
            if (mode, period) != (self._mode, self._period):
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._mode, self._period = mode, period
                self._quiet = mode is _NEVER
                if self._unsynced or self._writer.position > self._synced_pos:
                    self._written()
        if max_memory_size is not _UNSET:
            self._max_memory_size = max_memory_size
        if max_journal_size is not _UNSET:
            self._max_journal_size = max_journal_size

    @property
    def logsize(self) -> int:
        """Bytes of journal files on disk (preallocated space included)."""
        self._poll_compaction()
        return sum(segment.size for segment in self._segments)

    @property
    def used_bytes(self) -> int:
        """Bytes of records in the journal (what compaction can shrink)."""
        return self._sealed_used + self._writer.position

    @property
    def segment_count(self) -> int:
        return len(self._segments)

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
        if used > max(2 * live, self._segment_size):
            return True
        limit = self._max_journal_size
        return used > limit and live < limit and used - live > self._segment_size

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

    def _start_snapshot(self, open_items: list, memory_items: list) -> SnapshotJob:
        """Rotate (appends go on in a fresh segment), then write the live state as a snapshot
        of every older segment, on a thread. JournalError if the rotation fails."""
        snapshot_seq = self._next_seq
        self._next_seq += 1
        self._rotate(0, self._segments[-1].size if self._segments else None)
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
        return used > self._segment_size // 2 or (rewrite and used > HEADER_SIZE)

    def _drop_history(self, rewrite: bool) -> None:
        """The queue is empty: every record before now is history. Deleting any prefix of the
        segments then leaves a log that replays to the same (empty) state, so the old
        segments go at once, oldest first."""
        if not self._segments:
            return
        if self._current_needs_rotation(rewrite):
            try:
                self._rotate(0, self._segments[-1].size)
            except JournalError as exc:
                self._compaction_failed(exc)
                return
        old = self._segments[:-1]
        if not old:
            return
        self._delete_oldest(old)
        self._reset_counts(0, 0)
        self.rewrites += 1
        self._retry_delay = _RETRY_FIRST

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
        leaves a shorter prefix deleted, which replays to the same state."""
        self._forget(old)
        for segment in old:
            segment.close()
            try:
                os.unlink(segment.path)
            except FileNotFoundError:
                pass
        if self.directory not in self._dirs_unsynced:
            self._dirs_unsynced.append(self.directory)  # the unlinks, with the next sync

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
        for segment in old:
            segment.close()
        self.rewrites += 1
        self._retry_delay = _RETRY_FIRST
        if healing:
            self._healed()

    def _compaction_failed(self, exc: BaseException | None) -> None:
        self.last_compaction_error = exc
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
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

    # ---- files deleted under the server -----------------------------------------------------
    def files_lost(self, thorough: bool = True) -> bool:
        """True from the moment the journal finds its files deleted (by an operator, or a tmp
        cleaner, while the server runs) until :meth:`heal` has written the live state again:
        meanwhile its records are only in mappings of files a restart cannot find.

        ``thorough``: check the directory and every segment (the sweep's check, about once a
        second); else only the current segment (each fsync period). One ERROR line names the
        queue and the path found gone. On the loop thread.
        """
        if self._lost:
            return True
        if self._closed:
            return False
        gone = self._missing_path(thorough)
        if gone is None:
            return False
        self._lost = True
        log.error(
            "queue %s: %s was deleted while the server runs; writing the queue's live state "
            "again in %s",
            self.directory.name,
            gone,
            self.directory,
        )
        return True

    def _directory_gone(self) -> None:
        """A new segment could not be made because its directory is gone: have the owner
        heal the journal on the loop's next pass (not inside this append), rather than at
        the next fsync period's or sweep's check, with every write refused until then."""
        commit, on_lost = self._commit, self.on_lost
        if commit is None or on_lost is None or self._lost or self._heal_soon:
            return
        self._heal_soon = True
        commit.loop.call_soon(self._heal_if_lost)

    def _heal_if_lost(self) -> None:
        self._heal_soon = False
        if not self._closed and self.on_lost is not None and self.files_lost():
            self.on_lost()

    def check_current(self) -> None:
        """Each fsync period: the current segment must still have a name; if not, call
        ``on_lost`` (whose owner heals the journal with its live state)."""
        if not self._lost and self.files_lost(thorough=False) and self.on_lost is not None:
            self.on_lost()

    def _missing_path(self, thorough: bool) -> Path | None:
        """The first of the journal's paths that is gone, or None.

        The thorough check asks every segment only while the directory changes: unlinking or
        renaming a file sets its directory's mtime, so once checks _DIR_SETTLE seconds apart
        have found the same mtime and every segment named, a change since would have given
        another mtime (the wait rules out one made within the clock tick of the mtime read
        first, which could leave it as it was). An idle queue then costs one stat a sweep."""
        self._poll_compaction()
        mtime = None
        if thorough:
            try:
                st = os.stat(self._dir_path)
            except (FileNotFoundError, NotADirectoryError):
                return self.directory
            except OSError:  # cannot tell: ask the segments
                pass
            else:
                here = (st.st_dev, st.st_ino)
                if self._dir_id and here != self._dir_id:
                    return self.directory  # another directory in its place
                if not self._dir_id:
                    self._dir_id = here
                mtime = st.st_mtime_ns
                if self._dir_settled and mtime == self._dir_mtime:
                    return None
            segments = self._segments
        else:
            segments = self._segments[-1:]
        job = self._job
        passing = set(job.old_segments) if job is not None else ()  # a compaction unlinks them
        for segment in segments:
            if segment not in passing and segment.unlinked():
                return segment.path
        if thorough:
            now = time.monotonic()
            if mtime is None or mtime != self._dir_mtime:
                self._dir_mtime, self._dir_seen_at, self._dir_settled = mtime, now, False
            else:
                self._dir_settled = now - self._dir_seen_at >= _DIR_SETTLE
        return None

    def heal(self, open_items: Sequence, memory_items: Sequence) -> None:
        """After :meth:`files_lost`: make the directory again and write the live state there
        (arguments as for :meth:`compact`) as a compaction snapshot: written beside, fsynced,
        renamed, so a crash meanwhile loses nothing that a crash before could keep. The items
        only on disk are copied from the deleted files, still mapped; those are released
        once the snapshot is in place. A failure is logged and leaves ``files_lost`` true for
        the next call to try again; while no segment with a name takes appends, they raise
        JournalError (SERVER_ERROR) rather than go where a restart cannot find them."""
        self._poll_compaction()
        if not self._lost or self._closed:
            return
        job = self._job
        if job is not None:
            if job is self._heal_job:
                return  # under way
            self._stop_compaction()  # its snapshot would go to the old directory, or nowhere
        try:
            self._make_directory()
            self._drop_spare()
            self._refusing = False
            self._heal_job = self._start_snapshot(list(open_items), list(memory_items))
        except (OSError, JournalError) as exc:
            self._heal_failed(exc)
        else:
            self._needs_rewrite = False  # the snapshot holds no damaged record either
            # The deleted segments can never be synced where a restart looks: what they hold
            # goes into the snapshot, which is synced before it replaces them. Kept pending,
            # they would fail the sync of every append made meanwhile, in the new segment.
            self._unsynced = [segment for segment in self._unsynced if not segment.unlinked()]

    def _make_directory(self) -> None:
        """The queue's directory again (its parent is not made: a data directory that is
        gone is the operator's to restore)."""
        try:
            os.mkdir(self.directory)
        except FileExistsError:
            pass
        else:
            if self.directory.parent not in self._dirs_unsynced:
                self._dirs_unsynced.append(self.directory.parent)
        self._dir_id = _identity(self._dir_path)
        self._dir_mtime, self._dir_settled = None, False

    def _drop_spare(self) -> None:
        """Discard the spare segment file, made (or being made) in the deleted directory."""
        pending, self._spare = self._spare, None
        if pending is not None:
            pending.add_done_callback(_discard_spare)  # at once if it is done

    def _heal_failed(self, exc: BaseException) -> None:
        """Stop appending into a file without a name, and say why (again only after a while,
        or if the reason changes)."""
        if self._writer is not self._null_writer and self._segments[-1].unlinked():
            self._seal_current()
        self._refusing = self._writer is self._null_writer
        if isinstance(exc, CompactionAborted):
            return  # closed or deleted meanwhile: nothing to say
        why, now = str(exc), time.monotonic()
        last, at = self._heal_logged
        if why != last or now - at >= _HEAL_LOG_EVERY:
            self._heal_logged = (why, now)
            log.error(
                "queue %s: cannot write its deleted journal again in %s (%s); trying again%s",
                self.directory.name,
                self.directory,
                why,
                ", refusing writes meanwhile" if self._refusing else "",
            )

    def _healed(self) -> None:
        self._lost = self._refusing = False
        self._heal_logged = ("", 0.0)
        log.info(
            "queue %s: its live state is in %s again; the deleted files are released",
            self.directory.name,
            self.directory,
        )

    # ---- durability ------------------------------------------------------------------------
    def take_dirty(self) -> SyncWork:
        """What must be synced for every append so far; called on the loop thread. The
        caller syncs it with :meth:`sync_work` (any thread) or gives it back with
        :meth:`restore_dirty`."""
        segments, self._unsynced = self._unsynced, []
        writer = self._writer
        if writer is not self._null_writer and writer.position > self._synced_pos:
            segments.append(self._segments[-1])
            self._synced_pos = writer.position
        directories, self._dirs_unsynced = self._dirs_unsynced, []
        return SyncWork(segments, directories)

    def sync_work(self, work: SyncWork) -> None:
        """fdatasync the segments and fsync the directories of ``work``; thread-safe."""
        try:
            for segment in work.segments:
                segment.sync()
            for directory in work.directories:
                with contextlib.suppress(FileNotFoundError):  # deleted: nothing of it to keep
                    fsync_directory(directory)
        except OSError as exc:
            raise JournalError(f"fsync of {self.directory} failed: {exc.strerror or exc}") from exc

    def restore_dirty(self, work: SyncWork) -> None:
        """A sync failed: keep its segments pending for the next one."""
        current = self._segments[-1] if self._writer is not self._null_writer else None
        for segment in work.segments:
            if segment is current:
                self._synced_pos = 0
            elif not segment.closed and segment not in self._unsynced:
                if self._heal_job is not None and segment.unlinked():
                    continue  # deleted under the server: the heal's snapshot holds it
                self._unsynced.append(segment)
        for directory in work.directories:
            if directory not in self._dirs_unsynced:
                self._dirs_unsynced.append(directory)
        if self._mode is _PERIOD and self._commit is not None and self._timer is None:
            self._written()  # try again after another period

    def timer_fired(self) -> None:
        self._timer = None
        self._quiet = self._mode is _NEVER

    def sync(self) -> None:
        """fsync now, on this thread."""
        work = self.take_dirty()
        if work.empty:
            return
        try:
            self.sync_work(work)
        except JournalError:
            self.restore_dirty(work)
            raise
        self._next_sync_at = time.monotonic() + self._period

    # ---- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop any compaction, fsync, unmap and close. Raises JournalError if the final
        fsync fails (the files are closed anyway). A journal whose files were deleted first
        finishes writing its live state again (heal): stopped, it would lose it."""
        if self._closed:
            return
        heal = self._heal_job
        if heal is not None and heal is self._job:
            heal.join()
            self._poll_compaction()
        self._stop_compaction()
        error = None
        try:
            self.sync()
        except JournalError as exc:
            error = exc
        self._release()
        if error is not None:
            raise error

    def _release(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._commit is not None:
            self._commit.unregister(self)
        if self._writer is not self._null_writer:
            self._writer.release()
            self._writer = self._null_writer
        for segment in self._segments:
            segment.close()
        self._disk.clear()
        self._unsynced = []
        pending, self._spare = self._spare, None
        if pending is not None:  # wait: a spare must not appear after delete() emptied the dir
            wait_futures([pending])
            _discard_spare(pending)

    def delete(self) -> None:
        """Close and remove the queue's directory with every file in it."""
        if not self._closed:
            self._stop_compaction()
            self._release()
        # All or nothing, should the process die meanwhile. In a server only the rename
        # holds the loop up (and its sync, if every write here waits for one).
        commit = self._commit
        remove_queue_dir(
            self.directory,
            commit.background if commit is not None else None,
            durable_now=self._mode is _ALWAYS,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"QueueJournal({str(self.directory)!r}, segments={len(self._segments)})"
