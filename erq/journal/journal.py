"""QueueJournal: one queue's durable log (appends, segments, fsync policy, read-behind).

Writes go into the current segment's shared mapping (one memcpy in the codec; a large record
goes in with one pwritev on the segment's file instead, which spares the kernel zero-filling
pages that are about to be overwritten), so once an append returns the record is in the
kernel's page cache: killing the process loses nothing.
The fsync policy decides when it reaches the disk (see ``commit.py``).

Two parts live in modules of their own, mixed into the class: giving disk space back
(``reclaim.py``: releasing drained segments, compaction) and writing the live state again
when the files were deleted under the server (``healing.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from ..datadir import fsync_directory, remove_queue_dir
from ..heap import paused_gc
from ..journal_api import JournalError, OverLimit
from ..open_files import room_for_a_segment
from ..startsignals import block_in_this_thread
from . import codec
from .diskitems import DiskItems
from .format import (
    HEADER_FLAG_SNAPSHOT,
    HEADER_SIZE,
    OP_ADD,
    OP_FLUSH,
    OP_RECORD_SIZE,
    OP_UNREMOVE,
)
from .healing import Healing
from .reclaim import Reclaiming
from .recovery import RecoveredItem, Recovery, replay
from .segment import INITIAL_SEGMENT_SIZE, Segment, Spare, discard_spare, round_up
from .segrange import SegmentRange, write_range

log = logging.getLogger("erq.journal")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
_ALWAYS, _PERIOD, _NEVER = "always", "period", "never"
_UNSET = object()

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
            _allocator = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="erq-allocate", initializer=block_in_this_thread
            )
        return _allocator


class SyncWork:
    """Segments and directories with changes not yet on disk, taken for one sync; ``ends``:
    how far each segment was written when taken (what its sync covers)."""

    __slots__ = ("segments", "ends", "directories")

    def __init__(self, segments: list[Segment], ends: list[int], directories: list[Path]) -> None:
        self.segments = segments
        self.ends = ends
        self.directories = directories

    @property
    def empty(self) -> bool:
        return not self.segments and not self.directories

    @property
    def redo(self) -> bool:
        """Some segment must be written again before its sync (an earlier one failed)."""
        return any(segment.redo_from >= 0 for segment in self.segments)

    def synced(self) -> None:
        """The fsync worker synced this work: its segments are durable up to their ends."""
        for segment, end in zip(self.segments, self.ends, strict=True):
            segment.synced(end)


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


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class QueueJournal(codec.AppendCore, Reclaiming, Healing, metaclass=_JournalType):
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
        self._range: SegmentRange | None = None  # as the range file states it (segrange.py)
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
        # The next segment's file, allocated ahead on a worker thread (journals of a server,
        # which pass a commit, with segments of SPARE_MIN_SIZE or more; offline tools
        # allocate when they rotate).
        self._spare: Future | None = None
        self._spares = 0  # spare files made: their names
        self._closed = False
        self.rotations = 0  # segments sealed because they were full or for a compaction
        self.sync_failures_in_a_row = 0  # the first is logged, then the recovery (commit.py)
        self.sync_errors = 0  # syncs that failed (stats: journal_sync_errors)
        self._init_reclaiming()
        self._init_healing(directory)

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
        stop=None,
        item_cls=RecoveredItem,
    ) -> tuple[QueueJournal, Recovery]:
        """Open (creating the directory if missing) and replay a queue's journal.

        Recovery reads items into memory up to ``max_memory_size``, counting their data plus
        ``item_overhead`` bytes each (what the queue spends per item in RAM), each made of
        ``item_cls`` (a plain tuple class, or the queue's ItemMaker: ``erq.item.ITEM_MAKER``).
        ``stop``, a ``threading.Event``, set meanwhile ends the replay with RecoveryStopped.

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
            result = replay(directory, max_memory_size, item_overhead, stop, item_cls)
        except OSError as exc:
            # Out of descriptors, disk full, no permission: a request that would create the
            # queue gets SERVER_ERROR, and a new queue's directory is not left behind.
            if created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise JournalError(f"cannot open the journal in {directory}: {exc}") from exc
        journal._adopt(result)
        journal._open_range(result, result.recovery.warnings)
        # A new directory's name is durable once its parent is synced. One found here may
        # never have been (its server was killed before its first sync): the first sync
        # after the start makes sure of it and of the names of its segments.
        journal._dirs_unsynced.append(directory.parent)
        if not created and directory not in journal._dirs_unsynced:
            journal._dirs_unsynced.append(directory)
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
            self._next_size = max(self._next_size, min(self._segment_cap, current.size * 2))
        recovery = result.recovery
        self._disk = result.disk
        live = len(recovery.items) + recovery.disk_items
        self._totals[0], self._totals[1] = live, result.live_record_bytes  # for the mean size
        self._reset_counts(live, 0)
        self._id_floor = recovery.next_id
        self._needs_rewrite = result.damaged

    # ---- the segment range ------------------------------------------------------------------
    def _open_range(self, result, warnings: list[str]) -> None:
        """Take the range recovery found, and bring its file up to date: made for a journal
        that has none (written before ranges were kept: nothing was reported), grown to a
        segment a crash left past its end; one put there by hand beside it goes. What a
        lost segment left missing stays stated until compaction rewrites the journal."""
        self._range = result.range
        for extra in result.extra_ranges:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / extra.name)
        if self._segments or self._range is not None:
            first = self._range.first if self._range is not None else self._segments[0].seq
            if self._segments and self._segments[0].flags & HEADER_FLAG_SNAPSHOT:
                first = max(first, self._segments[0].seq)  # what it superseded is gone
            if not self._set_range(first, self._next_seq - 1):
                warnings.append(
                    f"{self.directory}: cannot write its range file: the loss of a first or "
                    "last segment may go unnoticed"
                )

    def _set_range(self, first: int, last: int) -> bool:
        """Rename the range file to state ``first``..``last``; False (logged) if it could not
        be. Only when segments come or go (see segrange.py), never per record."""
        new = SegmentRange(first, last)
        try:
            write_range(self.directory, self._range, new)
        except OSError as exc:
            log.warning(
                "journal %s: cannot write its range file %s: %s",
                self.directory,
                new.name,
                exc.strerror or exc,
            )
            return False
        self._range = new
        if self.directory not in self._dirs_unsynced:
            self._dirs_unsynced.append(self.directory)  # the rename, with the next sync
        return True

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

    def _rotate(
        self, record_size: int, size: int | None = None, flags: int = 0
    ) -> codec.SegmentWriter:
        """Seal the current segment and start a new one with room for ``record_size`` bytes
        (``flags``: its header's)."""
        if self._closed:
            raise JournalError(f"journal {self.directory} is closed")
        if self._refusing:
            raise JournalError(
                f"the journal in {self.directory} was deleted and cannot be written again yet"
            )
        if record_size > OP_RECORD_SIZE and not room_for_a_segment():
            # An item's segment stops short of the open-file limit; one for removals, opens
            # and confirms (OP_RECORD_SIZE) or a compaction (0), which gives segments back,
            # may go on into what it leaves.
            raise OverLimit("too many open files for another journal segment (ulimit -n)")
        if size is None:
            size = self._next_size
        least = round_up(HEADER_SIZE + record_size)
        size = max(size, least)
        spare = self._take_spare(size)
        while True:
            try:
                segment = Segment.create(
                    self.directory,
                    self._next_seq,
                    size,
                    flags=flags,
                    id_floor=self._id_floor_now(),
                    spare=spare,
                )
                break
            except JournalError as exc:
                cause = exc.__cause__
                if isinstance(cause, (FileNotFoundError, NotADirectoryError)):
                    self._directory_gone()
                    raise
                if size <= least or getattr(cause, "errno", None) not in _DISK_FULL:
                    raise
                # No room for a segment of the size the journal grew to: a smaller one, down
                # to one that holds the record, while the disk is short (a queue of 64 KiB
                # items was refused with half the disk free: its next segment wanted 34 MiB).
                size = max(least, round_up(size // 4))
                self._next_size = size
                spare = None
        self._next_seq += 1
        self._seal_current()
        # Named before the range grows to it, and before a record goes in (segrange.py). A
        # journal with no segment left starts here: nothing before it holds anything.
        kept = self._range.first if self._segments and self._range is not None else None
        self._segments.append(segment)
        self._set_range(self._segments[0].seq if kept is None else kept, segment.seq)
        self._writer = writer = codec.SegmentWriter(segment.mm, HEADER_SIZE, True, segment.fileno())
        self._synced_pos = 0  # the header too
        self._next_size = min(self._segment_cap, max(self._next_size, size) * 2)
        if self.directory not in self._dirs_unsynced:
            self._dirs_unsynced.append(self.directory)
        if self._commit is not None and self._next_size >= SPARE_MIN_SIZE:
            self._spares += 1
            self._spare = _spare_allocator().submit(
                Spare.allocate, self.directory, self._spares, self._next_size
            )
        return writer

    def _drop_spare(self) -> None:
        """Discard the spare segment file (made or being made): an idle queue gives its space
        back, a deleted directory cannot use it."""
        pending, self._spare = self._spare, None
        if pending is not None:
            pending.add_done_callback(discard_spare)  # at once if it is done

    def _take_spare(self, size: int) -> Spare | None:
        """The allocated spare if it is ready and big enough; never waits for one."""
        pending, self._spare = self._spare, None
        if pending is None:
            return None
        if not pending.done():
            pending.add_done_callback(discard_spare)
            return None
        if pending.exception() is not None:  # a full disk, say: the rotation tries itself
            return None
        spare = pending.result()
        if spare.size < size or spare.size > max(size, self._segment_cap):
            spare.discard()  # too small for the record, or made before a lower cap
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
    def read_behind(
        self, max_bytes: int, max_items: int = -1, first_max: int = -1, cls=RecoveredItem
    ) -> list:
        """The next not-in-memory items in FIFO order: as many as fit in ``max_bytes`` of
        data and, with ``max_items`` >= 0, no more than that many; at least one if any
        remain, unless ``first_max`` >= 0 and the first has more data than that. ``cls``
        may be another plain tuple class, or a codec ItemMaker: the queue's refill has its
        items made from their records (``erq.item.ITEM_MAKER``)."""
        self._poll_compaction()
        try:
            return self._disk.take(max_bytes, cls, max_items, first_max)
        except ValueError as exc:
            raise JournalError(f"cannot read an item back: {exc}") from exc

    @property
    def disk_items(self) -> int:
        return self._disk.count

    @property
    def disk_bytes(self) -> int:
        return self._disk.nbytes

    def spill(self, items: Sequence) -> int | None:
        """Keep ``items`` only here from now on, at the head of the not-in-memory ones: the
        queue's newest in-memory items, in queue order (a reload lowered max_memory_size).
        Their ADD records are found in the segments; nothing is written, so a restart finds
        the same queue. Returns how many of the last ones it took: all, or fewer should a
        record not be found (the rest stay in memory). None while a snapshot is being
        written (compaction, heal): it will move the records, so the queue asks again later."""
        self._poll_compaction()
        if self._job is not None or self._closed or self._lost:
            return None
        with paused_gc():
            found = self._find_adds({item.id for item in items})
            n = 0
            while n < len(items) and items[len(items) - 1 - n].id in found:
                n += 1
            taken = items[len(items) - n :]
            self._disk.push_front(
                [found[item.id] for item in taken], sum(len(item.data) for item in taken)
            )
            del found, taken  # freed while the GC is off: no collection walks them first
        return n

    def _find_adds(self, ids: set[int]) -> dict[int, tuple[Segment, int]]:
        """Where the ADD records of ``ids`` are: (segment, offset) by id. Segments that hold
        none of them are skipped as release_head skips them: a segment's successor has an
        id_floor greater than every id added in it."""
        found: dict[int, tuple[Segment, int]] = {}
        segments = self._segments
        if not ids or not segments:
            return found
        lowest = min(ids)
        first = 0
        while first + 1 < len(segments) and segments[first + 1].id_floor <= lowest:
            first += 1
        current = segments[-1] if self._writer is not self._null_writer else None
        for segment in segments[first:]:
            end = self._writer.position if segment is current else segment.used
            for record in codec.iter_records(segment.mm, HEADER_SIZE, end, False):
                if record[1] == OP_ADD and record[2] in ids:
                    found.setdefault(record[2], (segment, record[0]))  # the first, as replay
            if segment is not current:
                segment.drop_pages()  # the walk mapped its pages
        return found

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
            lower = min(self._next_size, self._segment_cap)
            if lower < self._next_size:
                self._next_size = lower
                self._drop_spare()  # made for the old cap: the next rotation makes its own

    @property
    def _segment_cap(self) -> int:
        """The largest segment a rotation makes (a record that needs more gets more): the
        configured segment size, or a quarter of ``max_journal_size`` if that is less, so a
        journal kept small is not held in a few huge files."""
        quarter = max(INITIAL_SEGMENT_SIZE, round_up(self._max_journal_size // 4))
        return min(self._segment_size, quarter)

    @property
    def logsize(self) -> int:
        """Bytes of journal files on disk (preallocated space and an allocated spare
        included)."""
        self._poll_compaction()
        size = sum(segment.size for segment in self._segments)
        spare = self._spare
        if spare is not None and spare.done() and spare.exception() is None:
            size += spare.result().size
        return size

    @property
    def used_bytes(self) -> int:
        """Bytes of records in the journal (what compaction can shrink)."""
        return self._sealed_used + self._writer.position

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # ---- durability ------------------------------------------------------------------------
    def take_dirty(self) -> SyncWork:
        """What must be synced for every append so far; called on the loop thread. The
        caller syncs it with :meth:`sync_work` (any thread) or gives it back with
        :meth:`restore_dirty`."""
        segments, self._unsynced = self._unsynced, []
        ends = [segment.used for segment in segments]  # sealed: written to the end
        writer = self._writer
        if writer is not self._null_writer and writer.position > self._synced_pos:
            segments.append(self._segments[-1])
            ends.append(writer.position)
            self._synced_pos = writer.position
        directories, self._dirs_unsynced = self._dirs_unsynced, []
        return SyncWork(segments, ends, directories)

    def sync_work(self, work: SyncWork) -> None:
        """fdatasync the segments and fsync the directories of ``work``; thread-safe."""
        try:
            for segment, end in zip(work.segments, work.ends, strict=True):
                try:
                    segment.sync(end)
                except FileNotFoundError:
                    if not self.superseded(segment):
                        raise
            for directory in work.directories:
                with contextlib.suppress(FileNotFoundError):  # deleted: nothing of it to keep
                    fsync_directory(directory)
        except OSError as exc:
            raise JournalError(f"fsync of {self.directory} failed: {exc.strerror or exc}") from exc

    def superseded(self, segment: Segment) -> bool:
        """Whether erq itself deleted ``segment``, so that its sync owes nothing: released or
        replaced (closed), or an old segment of a compaction whose snapshot is in place (the
        job deletes them on its thread, before the loop swaps the snapshot in and closes
        them; a sync running meanwhile finds them deleted, and may even end while the loop
        closes them). Thread-safe."""
        return segment.closed or segment.replaced

    def restore_dirty(self, work: SyncWork) -> None:
        """A sync failed: keep its segments pending for the next one, which writes them again
        from their last good sync (see Segment)."""
        self.sync_errors += 1
        current = self._segments[-1] if self._writer is not self._null_writer else None
        for segment in work.segments:
            segment.sync_failed()
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
        finishes writing its live state again (heal): stopped, it would lose it; if it could
        not (its data directory is gone, say), JournalError says that what it held is lost."""
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
        if self._lost:
            error = JournalError(
                f"its journal was deleted and could not be written again in {self.directory}: "
                "what it held is lost"
            )
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
            discard_spare(pending)

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
