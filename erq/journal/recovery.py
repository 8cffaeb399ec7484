"""Reading a queue's journal back: segment scanning with damage handling, and replay.

Damage rule (what is a torn tail, what is a damaged record). Reading stops at the first
offset that does not hold a valid record (CRC and shape checked), or at a zero length that is
followed by anything non-zero. From that offset ``resync`` looks for where valid records
resume: the first later offset holding a valid record that is followed by another valid
record or by a clean end (nothing but zeros). One valid-looking record alone is not enough,
so item data is practically never mistaken for records, while a damaged length field (which
hides where the next record starts) costs nothing more than a damaged body. If records
resume, the bytes in between are a damaged record: reported (file and offset), skipped, and
replay goes on. If nothing valid follows, it is a torn tail: reported and truncated (zeroed
in the segment that takes new appends).

Replay semantics: ADD appends the id at the tail; REMOVE drops it (queued or open); OPEN
moves a queued id to the open reads; CONFIRM drops an open id; UNREMOVE moves an open id to
the head; FLUSH drops every queued (not open) id. Unknown ids are ignored. At the end the
open ids go back to the head in the order of their OPEN records.

Replay keeps only positions (segment, offset) per live id, never item data: the queued ids
in a ``codec.ReplayTail`` (about 4 bytes per item), the few unremoved and open ones in dicts.
Afterwards every position goes to DiskItems, a segment's run at a time, and the first
``max_memory_size`` bytes of the queue are read back from there, as a running queue's refill
reads them; the rest stays on disk as positions (read-behind).
"""

from __future__ import annotations

import logging
import os
import struct
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from ..journal_api import JournalError, RecoveryStopped
from . import codec
from .diskitems import DiskItems
from .format import (
    ADD_FIXED_LENGTH,
    ADD_OVERHEAD,
    HEADER_FLAG_AFTER_SNAPSHOT,
    HEADER_FLAG_SNAPSHOT,
    HEADER_SIZE,
    REC_BAD,
    REC_END,
    REC_VALID,
    parse_segment_name,
    segment_name,
)
from .segment import Segment, SegmentHeaderError, SegmentVersionError
from .segrange import RANGE_SUFFIX, SegmentRange, parse_range_name, pick_range, several_ranges

log = logging.getLogger("erq.journal")

_U32 = struct.Struct("<I")
_POS_SHIFT = 40  # a replay position is segment index << 40 | offset
_POS_MASK = (1 << _POS_SHIFT) - 1
_DROP_BYTES = 4 << 20  # bytes read through a mapping between two drops of its pages
# Items loaded into memory between two looks at the stop event (the most one DiskItems.take
# of the load reads): small items reach _DROP_BYTES only after ~400,000 of them, seconds of
# the pure-Python build's loading.
_LOAD_STOP_CHECK = 1 << 12
LEFTOVER_SUFFIXES = (".seg.new", ".seg.tmp")  # interrupted creation or compaction
DAMAGED_SUFFIX = ".damaged"
HEADER_SUFFIX = ".header" + DAMAGED_SUFFIX  # a damaged header, kept beside its segment


class RecoveredItem(NamedTuple):
    """An item read back from the journal (a NamedTuple: use attributes or unpack)."""

    id: int
    flags: int
    add_time: int
    expiry: int
    data: bytes


@dataclass
class Recovery:
    """What a queue gets back when its journal is opened."""

    items: list  # held in memory (replay's item_cls), queue order; reads open at the crash first
    disk_items: int  # further items after ``items``, left on disk: QueueJournal.read_behind
    disk_bytes: int  # their data bytes
    next_id: int  # greater than every id this queue's journal ever held
    warnings: list[str] = field(default_factory=list)  # "<file>: <problem> at offset N, ..."


@dataclass
class Problem:
    """A failure found while scanning a segment. ``resume`` is -1 for a torn tail."""

    offset: int
    status: int  # REC_* found at ``offset``
    resume: int

    def describe(self, path: os.PathLike | str) -> str:
        if self.resume < 0:
            return f"{path}: torn record at offset {self.offset}, truncated"
        skipped = self.resume - self.offset
        if self.status == REC_BAD:
            return f"{path}: bad CRC at offset {self.offset}, record skipped ({skipped} bytes)"
        return f"{path}: damaged data at offset {self.offset}, {skipped} bytes skipped"


class SegmentScan:
    """Walk the valid records of a segment buffer across damage (see the module doc).

    :meth:`run` hands each stretch of valid records to a reader; afterwards ``problems``
    lists what was found and ``end`` is where the valid data ends (where appends go on).
    Iterating the scan gives the records themselves (for the offline tools). ``drop`` (a
    segment's ``drop_pages``) is called between windows of the zeros that end the data, so
    checking a preallocated segment's empty rest does not map all of it at once.
    """

    def __init__(
        self,
        buffer,
        *,
        data: bool = False,
        start: int = HEADER_SIZE,
        drop: Callable[[], None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._data = data
        self._start = start
        self._drop = drop
        self.problems: list[Problem] = []
        self.end = start

    def run(self, read: Callable[[int, int], tuple[int, int]]) -> None:
        """``read(start, end)`` consumes the valid records from ``start`` (up to ``end``) and
        returns (REC_* status, offset) where it stopped."""
        buf, pos = self._buffer, self._start
        size = len(buf)
        while True:
            status, stop = read(pos, size)
            if status == REC_END and self._zeros(stop, size):
                self.end = stop
                return
            resume = codec.resync(buf, stop, size)
            if resume < 0:
                self.problems.append(Problem(stop, status, resume))
                self.end = stop
                return
            for piece in _split(buf, stop, resume, status):
                if piece.status == REC_VALID:  # a good record between two damaged ones
                    read(piece.offset, piece.resume)
                else:
                    self.problems.append(piece)
            pos = resume

    def _zeros(self, start: int, end: int) -> bool:
        """Nothing but zeros in [start, end)."""
        step = end - start if self._drop is None else _DROP_BYTES
        while start < end:
            stop = min(end, start + step)
            if codec.first_nonzero(self._buffer, start, stop) >= 0:
                return False
            if self._drop is not None:
                self._drop()
            start = stop
        return True

    def __iter__(self) -> Iterator[tuple]:
        records: list[tuple] = []

        def read(start: int, end: int) -> tuple[int, int]:
            it = codec.iter_records(self._buffer, start, end, self._data)
            records.extend(it)
            return it.status, it.position

        self.run(read)
        return iter(records)


def _split(buf, start: int, resume: int, status: int) -> list[Problem]:
    """One piece per record of a skipped region when their lengths chain exactly to
    ``resume`` (adjacent damaged records, maybe with good ones between them, which the
    chain vouches for), else one problem for the whole region."""
    starts = [start]
    pos = start
    while True:
        length = _U32.unpack_from(buf, pos)[0] if pos + 4 <= resume else 0
        if length == 0 or pos + 8 + length > resume:
            return [Problem(start, status, resume)]
        pos += 8 + length
        if pos == resume:
            break
        starts.append(pos)
    ends = [*starts[1:], resume]
    return [
        Problem(s, codec.check_record(buf, s, e)[0], e) for s, e in zip(starts, ends, strict=True)
    ]


@dataclass
class ReplayResult:
    """Everything QueueJournal.open needs besides the Recovery it hands to the queue."""

    segments: list[Segment]  # oldest first; the last one is mapped writable
    recovery: Recovery
    disk: DiskItems  # positions of the items in ``recovery`` that stayed on disk
    open_ids: list[int]  # reads open at the crash, in OPEN order (now back at the head)
    next_seq: int
    live_record_bytes: int  # record bytes of every live item (compaction heuristics)
    damaged: bool
    range: SegmentRange | None = None  # the range file found (None: the journal has none)
    extra_ranges: list[SegmentRange] = field(default_factory=list)  # more, put there by hand


class Listing(NamedTuple):
    """What a queue's directory holds, as replay sees it."""

    found: list[tuple[int, Path]]  # segment files by sequence number
    max_seq: int  # the highest number in use (set-aside files included: never reused)
    aside: set[int]  # numbers of the files set aside
    ranges: list[SegmentRange]  # the range files (one, unless put there by hand)


def _list_directory(directory: Path) -> Listing:
    """What ``directory`` holds (see ``classify``); leftovers of interrupted writes are
    deleted."""
    entries = []
    for entry in os.scandir(directory):
        if entry.name.endswith(LEFTOVER_SUFFIXES):
            os.unlink(entry.path)
        else:
            entries.append((entry.name, entry.is_file()))
    return classify(directory, entries)


def classify(directory: Path, entries: Iterable[tuple[str, bool]]) -> Listing:
    """The segment files, the highest number in use, the numbers set aside and the range
    files among a directory's ``entries`` ((name, is a file) pairs); other names are not the
    journal's."""
    found: list[tuple[int, Path]] = []
    max_seq = 0
    aside: set[int] = set()
    ranges: list[SegmentRange] = []
    for name, is_file in entries:
        if name.endswith(DAMAGED_SUFFIX):
            seq = parse_segment_name(name[: -len(DAMAGED_SUFFIX)])
            if seq is not None:
                max_seq = max(max_seq, seq)
                aside.add(seq)
            continue
        if name.endswith(RANGE_SUFFIX):
            stated = parse_range_name(name)
            if stated is not None:
                ranges.append(stated)
            continue
        seq = parse_segment_name(name)
        if seq is not None and is_file:
            found.append((seq, directory / name))
            max_seq = max(max_seq, seq)
    found.sort()
    ranges.sort()
    return Listing(found, max_seq, aside, ranges)


class MissingSegments(NamedTuple):
    """Segment numbers ``first``..``last`` absent from ``directory``: between the segments
    ``before`` and ``after``, or at either end (None there), against the journal's range."""

    directory: Path
    first: int
    last: int
    before: Segment | None
    after: Segment | None

    def describe(self) -> str:
        names = segment_name(self.first)
        if self.last > self.first:
            names = f"{names} to {segment_name(self.last)}"
        before, after = self.before, self.after
        if before is not None and after is not None:
            where = f"between {before.path.name} and {after.path.name}"
        elif after is not None:
            where = f"before {after.path.name}, the first one left"
        elif before is not None:
            where = f"after {before.path.name}, the last one left"
        else:
            where = "and no segment of this journal is left"
        return (
            f"{self.directory}: segment {names} missing {where}: what it held is lost "
            "(the items it added; the items it removed come back)"
        )


def missing_segments(
    directory: Path,
    segments: list[Segment],
    accounted: Collection[int] = (),
    expected: SegmentRange | None = None,
) -> list[MissingSegments]:
    """The numbers missing from ``segments`` (those replay reads, in order): between them,
    and with the journal's range ``expected`` also before the first and after the last
    (see ``segrange.py``); a snapshot among them, always the first, starts the count when
    ``expected`` starts lower. Besides the ``accounted`` numbers (set aside, reported
    already) and the number a compaction took for a snapshot it did not finish (see
    ``HEADER_FLAG_AFTER_SNAPSHOT``; never the range's first number, which only ever names
    a segment once written, a finished snapshot's included): files lost, deleted by hand or
    by another program. Replay goes on without them."""
    seqs = [seg.seq for seg in segments]
    if expected is None:
        if not segments:
            return []
        low, high = seqs[0], seqs[-1]
    else:
        low, high = expected
        if segments and segments[0].flags & HEADER_FLAG_SNAPSHOT:
            low = max(low, seqs[0])
        if segments:
            high = max(high, seqs[-1])
    unfinished = {seg.seq - 1 for seg in segments if seg.flags & HEADER_FLAG_AFTER_SNAPSHOT}
    if expected is not None:
        unfinished.discard(expected.first)  # the range starts at a segment that was written
    known = sorted({*seqs, *accounted, *unfinished})
    gaps = []
    expect = low
    for seq in chain(known[bisect_left(known, low) :], [high + 1]):
        if seq > high + 1:
            seq = high + 1
        if seq > expect:
            at = bisect_left(seqs, expect)
            before = segments[at - 1] if at else None
            after = segments[at] if at < len(segments) else None
            gaps.append(MissingSegments(directory, expect, seq - 1, before, after))
        expect = max(expect, seq + 1)
        if expect > high:
            break
    return gaps


class _Misplaced(SegmentHeaderError):
    """A sound header that names another segment than its file name: a misplaced file."""


def _open_segments(
    found: list[tuple[int, Path]], warnings: list[str]
) -> tuple[list[Segment], dict[Segment, bytes]]:
    """The segments replay reads, the last one writable, and the damaged headers among them
    (each with its bytes as found): such a segment's records are read all the same (a bit
    flip in 32 bytes must not cost a whole segment's items), as a plain segment numbered by
    its file name, and ``_replay`` gives it a header again."""
    segments: list[Segment] = []
    damaged: dict[Segment, bytes] = {}
    for seq, path in found:
        try:
            seg = Segment.open(path, writable=False)
            if seg.seq != seq:  # a sound header that names another file: not bit damage
                seg.close()
                raise _Misplaced(f"header names segment {seg.seq}")
        except SegmentVersionError as exc:
            raise JournalError(
                f"{path}: {exc}; start the erq that wrote this journal (this one neither "
                "reads nor changes it)"
            ) from None
        except _Misplaced as exc:
            _set_aside(path, str(exc), warnings)
            continue
        except SegmentHeaderError as exc:
            try:
                seg = Segment.open(path, writable=False, damaged_as=seq)
            except SegmentHeaderError as short:
                _set_aside(path, f"{exc}; {short}", warnings)
                continue
            damaged[seg] = bytes(seg.mm[:HEADER_SIZE])
            warnings.append(
                f"{path}: bad segment header ({exc}); its records are read as those of "
                f"segment {seq} (its file name) and the header is written again, the damaged "
                f"one kept in {path.name}{HEADER_SUFFIX}"
            )
        segments.append(seg)
    # A snapshot holds the whole state as of its creation: older segments are superseded
    # (left over when compaction was interrupted after its rename).
    for i in range(len(segments) - 1, 0, -1):
        if segments[i].flags & HEADER_FLAG_SNAPSHOT:
            for old in segments[:i]:
                old.close()
                os.unlink(old.path)
                damaged.pop(old, None)
            segments = segments[i:]
            break
    if segments:  # the last one takes new appends (and a torn tail is zeroed in it)
        last = segments[-1]
        last.close()
        as_seq = last.seq if last in damaged else None
        segments[-1] = Segment.open(last.path, writable=True, damaged_as=as_seq)
        if last in damaged:
            damaged[segments[-1]] = damaged.pop(last)
    return segments, damaged


def _set_aside(path: Path, why: str, warnings: list[str]) -> None:
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    os.rename(path, aside)
    warnings.append(f"{path}: bad segment header ({why}), file set aside as {aside.name}")


def _repair_header(seg: Segment, found: bytes, warnings: list[str]) -> None:
    """Keep the damaged header beside the segment, then write the segment's own."""
    try:
        with open(seg.path.with_name(seg.path.name + HEADER_SUFFIX), "wb") as kept:
            kept.write(found)
        seg.rewrite_header()
    except OSError as exc:  # read-only or full disk: the next start reads it the same way
        warnings.append(f"{seg.path}: cannot write its header again: {exc.strerror or exc}")


def _stop_if_asked(halt: Any, seg: Segment) -> None:
    if halt is not None and halt.is_set():
        raise RecoveryStopped(str(seg.path))


def replay(
    directory: Path,
    max_memory_size: int,
    item_overhead: int = 0,
    stop: Any = None,
    item_cls: Any = RecoveredItem,
) -> ReplayResult:
    """Open and replay every segment of ``directory`` (see the module doc). Each item read
    into memory is charged its data plus ``item_overhead`` bytes against ``max_memory_size``
    (what the queue holding it spends on it: the same budget as while it runs), and made as
    ``codec.read_adds`` makes it of ``item_cls``: a plain tuple class, or the queue's own
    ItemMaker (``erq.item.ITEM_MAKER``), which spares a restart a tuple and three ints per
    item that the queue would turn into its item and free (a server restarted over a million
    small items held ~90 MiB more once ready than the one that queued them: the freed
    tuples' memory stays with the allocator, between the items).

    ``stop`` (a ``threading.Event``) set meanwhile raises RecoveryStopped at the next window
    of records (_DROP_BYTES) or, while items are loaded, the next _LOAD_STOP_CHECK items: a
    stop signal must not wait for the replay of a whole large
    queue, which takes tens of seconds in the pure-Python build."""
    warnings: list[str] = []
    found, max_seq, aside, ranges = _list_directory(directory)
    expected = pick_range(ranges)
    several = several_ranges(directory, ranges)
    if several is not None:
        warnings.append(several)
    segments, damaged_headers = _open_segments(found, warnings)
    accounted = aside.union(seq for seq, _ in found)  # the files set aside just now too
    gaps = missing_segments(directory, segments, accounted, expected)
    warnings.extend(gap.describe() for gap in gaps)
    try:
        return _replay(
            segments,
            damaged_headers,
            warnings,
            max_seq,
            max_memory_size,
            item_overhead,
            damaged=bool(gaps),  # compacted soon: the report stays until then
            halt=stop,
            item_cls=item_cls,
            expected=expected,
            ranges=ranges,
        )
    except BaseException:
        for seg in segments:
            seg.close()
        raise


def _replay(
    segments: list[Segment],
    damaged_headers: dict[Segment, bytes],
    warnings: list[str],
    max_seq: int,
    max_memory_size: int,
    item_overhead: int,
    damaged: bool,
    halt: Any = None,
    expected: SegmentRange | None = None,
    ranges: list[SegmentRange] | None = None,
    item_cls: Any = RecoveredItem,
) -> ReplayResult:
    tail = codec.ReplayTail()  # queued ids in ADD order, with their positions
    head: dict[int, int] = {}  # ids put back by UNREMOVE; queue order is reversed insertion
    opened: dict[int, int] = {}  # open reads in OPEN order
    max_id = 0
    id_floor = 1
    damaged = damaged or bool(damaged_headers)
    last = len(segments) - 1
    for index, seg in enumerate(segments):
        if seg in damaged_headers:
            # Its floor was lost: the lowest that is above every id before it keeps release
            # sound (it frees a prefix only once the next floor is at most the lowest live id).
            seg.id_floor = max(id_floor, max_id + 1)
        id_floor = max(id_floor, seg.id_floor)
        duplicates: list[int] = []

        _stop_if_asked(halt, seg)

        def read(start: int, end: int, seg=seg, base=index << _POS_SHIFT, dups=duplicates):
            # A window of _DROP_BYTES at a time, dropping the pages read between two: a
            # snapshot segment holds the whole queue, which must not all be mapped at once.
            nonlocal max_id
            mm = seg.mm
            limit = min(end, start + _DROP_BYTES)
            while True:
                status, stop, max_id = codec.replay_records(
                    mm, start, limit, base, tail, head, opened, max_id, dups
                )
                if limit == end:
                    return status, stop
                _stop_if_asked(halt, seg)
                # Where the window ends the record at ``stop`` may not: judge it on the range.
                status, after = codec.check_record(mm, stop, end)
                if status != REC_VALID:
                    return status, stop
                seg.drop_pages()
                start = stop
                limit = min(end, max(start + _DROP_BYTES, after))

        scan = SegmentScan(seg.mm, drop=seg.drop_pages)
        scan.run(read)
        for offset in duplicates:
            warnings.append(f"{seg.path}: ADD of a live id at offset {offset}, ignored")
        for problem in scan.problems:
            warnings.append(problem.describe(seg.path))
        if scan.problems or duplicates:
            damaged = True
        if index == last and scan.problems and scan.problems[-1].resume < 0:
            seg.zero(scan.end)
        seg.used = seg.durable_to = scan.end  # read back from the file: a restart had it
        seg.drop_pages()  # the scan read every page: give them back to the page cache
        if seg in damaged_headers:
            _repair_header(seg, damaged_headers[seg], warnings)

    open_ids = list(opened)
    front = [*opened.values(), *reversed(head.values())]  # a few: open and unremoved reads
    opened.clear()
    head.clear()
    items, mem_bytes, record_bytes, disk = _load(
        front, tail, segments, max_memory_size, item_overhead, halt, item_cls
    )
    recovery = Recovery(
        items=items,
        disk_items=disk.count,
        disk_bytes=disk.nbytes,
        next_id=max(max_id + 1, id_floor),
        warnings=warnings,
    )
    return ReplayResult(
        segments=segments,
        recovery=recovery,
        disk=disk,
        open_ids=open_ids,
        next_seq=max(max_seq, expected.last if expected else 0) + 1,  # a lost one's too
        live_record_bytes=record_bytes,
        damaged=damaged,
        range=expected,
        extra_ranges=[r for r in ranges or () if r != expected],
    )


def _load(
    front: list[int],
    tail: Any,
    segments: list[Segment],
    max_memory_size: int,
    item_overhead: int,
    halt: Any = None,
    item_cls: Any = RecoveredItem,
):
    """Read the head of the queue (the positions in ``front``, then those of ``tail``, a
    ``codec.ReplayTail`` left empty) into memory up to ``max_memory_size`` bytes (data plus
    ``item_overhead`` per item); keep only the positions of the rest. Returns (items, their
    data bytes, live record bytes, disk).

    Every position goes to DiskItems first, and the head is read from there as a running
    queue's refill reads it: the tail's positions are released before any item is read, so
    that they never sit in memory beside the items (a restart over 1,000,000 items of 1 KiB
    with a 64 MiB budget peaked 18 MiB above what it held once ready). The tail hands them
    over a segment at a time, as the 32-bit offsets DiskItems keeps (``take_offsets``),
    shrinking as it goes: no Python int is made per item, and the positions are never held
    twice over.
    """
    disk = DiskItems()
    for pos in front:
        segment = segments[pos >> _POS_SHIFT]
        offset = pos & _POS_MASK
        disk.push(segment, offset, _U32.unpack_from(segment.mm, offset)[0] - ADD_FIXED_LENGTH)
    pieces = tail.take_offsets(_POS_SHIFT)  # the bulk, in ADD order: the only reference
    pieces.reverse()
    while pieces:
        index, offsets = pieces.pop()
        disk.extend(segments[index], offsets)
        del offsets  # kept by DiskItems only where it keeps offsets, not spans
    for seg in segments:
        seg.drop_pages()
    record_bytes = disk.nbytes + disk.count * ADD_OVERHEAD
    on_disk = disk.nbytes
    items: list = []
    left = max_memory_size
    while disk.count:
        # A step of items at their mean size, the overhead of as many set aside first: the
        # budget holds however their sizes vary. One at a time once fewer fit, so that the
        # load ends exactly where the next item would take the queue past its budget.
        size = disk.nbytes // disk.count + item_overhead
        width = min(_LOAD_STOP_CHECK, max(left // size if size else left, 1))
        max_bytes = left - width * item_overhead
        if max_bytes < 0:
            width, max_bytes = 1, left - item_overhead
            if max_bytes < 0:
                break
        before = disk.nbytes
        step = disk.take(max_bytes, item_cls, width, max_bytes)
        if not step:
            break
        items.extend(step)
        left -= before - disk.nbytes + len(step) * item_overhead
        _stop_if_asked(halt, segments[0])
    for seg in segments:
        seg.drop_pages()
    return items, on_disk - disk.nbytes, record_bytes, disk


__all__ = ["Problem", "RecoveredItem", "Recovery", "ReplayResult", "SegmentScan", "replay"]
