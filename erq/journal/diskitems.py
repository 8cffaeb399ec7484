"""Where the not-in-memory (read-behind) items are: a FIFO of record positions.

Items enter at the tail (``push``, or ``extend`` for a run of them: recovery's) and are read
back from the head (``take``), in FIFO order, as the queue's head drains; nothing else ever
removes one (``clear`` is FLUSH). Items the queue held in memory enter at the head
(``push_front``) when a reload lowers its ``max_memory_size``.

The FIFO is a deque of runs, each in one segment, of two kinds:

- a span: items whose ADD records lie back to back (a queue past its memory budget with no
  get in between: every set goes to disk, one record after the other). It is kept as its
  first offset and its count, whatever its length, and read back by walking the records'
  length fields (``codec.record_offsets``): a backlog of a million items costs no memory
  per item, as in Kestrel, whose read-behind is a second reader of the journal.
- an array: the offsets of items with other records between them (removals of the items
  gets took from memory meanwhile, or a restart's live items among dead ones), four bytes
  each in an ``array`` of 32-bit unsigned ints (8-byte ones only for a segment larger than
  4 GiB), widened to the 64-bit offsets ``codec.read_adds`` takes a window at a time. Once
  ``_SPAN_MIN`` pushed records in a row lie back to back, they leave it for a span.
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import codec
from .format import ADD_OVERHEAD

if TYPE_CHECKING:
    from .segment import Segment

_TRIM_AT = 4096  # drop consumed offsets once this many and half the run are consumed
_DROP_STEP = 1 << 20  # unmap the pages read back every this many bytes
_WINDOW = (64, 4096)  # fewest and most offsets widened for one read_adds call
_EXTEND_STEP = 4096  # offsets whose lengths extend reads between two drops of mapped pages
_SPAN_MIN = 64  # records pushed back to back that leave an array run for a span
_SPAN_STEP = 4096  # offsets a span's copy for a compaction snapshot makes at a time

# A run is a list of four. A span: [segment, None, offset of its next unread item, unread
# count]. An array: [segment, offsets, index of the next unread one, 0].

_NARROW = "I" if array("I").itemsize == 4 else "L"  # the C type of 32 bits
_WIDE = "Q"  # what read_adds takes
_NARROW_LIMIT = 1 << 32  # a segment up to this size has every offset below it
# In a 64-bit offset seen as two 32-bit halves, the half that holds the value below 2**32.
_LOW_HALF = 0 if sys.byteorder == "little" else 1


def _typecode(segment: Segment) -> str:
    return _NARROW if segment.size <= _NARROW_LIMIT else _WIDE


def low_halves(wide: array, start: int = 0, stop: int | None = None) -> array:
    """The low 32 bits of the 64-bit unsigned ints ``wide[start:stop]`` as a 32-bit array,
    copied in C with no Python int made per value: the narrowing of offsets below 2**32, or
    the offsets of recovery's positions (segment << 40 | offset) in a segment of 4 GiB at
    most."""
    out = array(_NARROW)
    with (
        memoryview(wide)[start:stop] as view,
        view.cast("B") as raw,
        raw.cast(_NARROW) as halves,
    ):
        out.frombytes(halves[_LOW_HALF::2].tobytes())
    return out


def _window(offsets: array, start: int, stop: int) -> memoryview:
    """offsets[start:stop] as 64-bit unsigned ints (read_adds' input): a view of a 64-bit
    array, else a widened copy. Release it before the array grows again."""
    if offsets.typecode == _WIDE:
        return memoryview(offsets)[start:stop]
    wide = bytearray(8 * (stop - start))  # the high halves stay zero
    with memoryview(wide) as raw, raw.cast(_NARROW) as halves:
        halves[_LOW_HALF::2] = memoryview(offsets)[start:stop]
    return memoryview(wide).cast(_WIDE)


def _span_window(segment: Segment, offset: int, width: int) -> memoryview:
    """The offsets of a span's ``width`` records from ``offset`` and, after them, where the
    next one starts, as 64-bit unsigned ints: fewer where a length leads outside the segment
    (the last then is where, for read_adds to refuse)."""
    wide = array(_WIDE, bytes(8 * (width + 1)))
    filled = codec.record_offsets(segment.mm, offset, wide)
    return memoryview(wide)[:filled]


class Span:
    """A span's unread offsets as of when it was asked for, walked as they are read: what
    ``DiskItems.runs`` gives a compaction snapshot, which reads them on its own thread. A
    length that leads outside the segment raises ValueError there (the snapshot fails, and
    the old segments stay) rather than end the walk short."""

    __slots__ = ("segment", "offset", "count")

    def __init__(self, segment: Segment, offset: int, count: int) -> None:
        self.segment = segment
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        offset, count = self.offset, self.count
        while count > 0:
            step = min(count, _SPAN_STEP)
            with _span_window(self.segment, offset, step) as window:
                if len(window) <= step:  # a length led outside the segment
                    yield from window[: len(window) - 1]
                    raise ValueError(f"{self.segment.path}: no record at offset {window[-1]}")
                yield from window[:step]
                offset = window[step]
            count -= step

    def __repr__(self) -> str:
        return f"<Span of {self.count} from {self.offset}>"


class DiskItems:
    """FIFO of (segment, offset) positions of ADD records, with item and data-byte counts."""

    __slots__ = ("_runs", "count", "nbytes", "_read_since_drop", "_tail", "_tail_end", "_streak")

    def __init__(self) -> None:
        self._runs: deque[list] = deque()
        self.count = 0
        self.nbytes = 0
        self._read_since_drop = 0  # data bytes read back since mapped pages were dropped
        self._forget_tail()

    def _forget_tail(self) -> None:
        """After a change to the runs other than a push: ``_tail`` is the last run (None if
        none), ``_tail_end`` where the last record pushed to it ends (-1: not known, so the
        next push starts a new stretch) and ``_streak`` how many pushed to a tail array
        before that lay back to back."""
        self._tail = self._runs[-1] if self._runs else None
        self._tail_end = -1
        self._streak = 0

    def push(self, segment: Segment, offset: int, nbytes: int) -> None:
        """Add the item whose ADD record, of ``nbytes`` data bytes, is at ``offset``."""
        self.count += 1
        self.nbytes += nbytes
        tail = self._tail
        if offset == self._tail_end and tail[0] is segment:
            self._tail_end = offset + ADD_OVERHEAD + nbytes
            if tail[1] is None:
                tail[3] += 1  # a span grows: the set of a queue past its memory budget
                return
            tail[1].append(offset)
            self._streak += 1
            if self._streak + 1 >= _SPAN_MIN:
                self._split_span()
            return
        self._push_apart(segment, offset, nbytes)

    def _push_apart(self, segment: Segment, offset: int, nbytes: int) -> None:
        """push, for a record not right after the last one pushed (or the first)."""
        tail = self._tail
        self._tail_end = offset + ADD_OVERHEAD + nbytes
        self._streak = 0
        if tail is not None and tail[0] is segment:
            if tail[1] is not None:
                tail[1].append(offset)
                return
            tail = [segment, array(_typecode(segment), (offset,)), 0, 0]
        else:
            tail = [segment, None, offset, 1]
        self._runs.append(tail)
        self._tail = tail

    def _split_span(self) -> None:
        """The last records of the tail array lie back to back: they leave it for a span."""
        tail = self._tail
        segment, offsets, index = tail[0], tail[1], tail[2]
        moved = min(self._streak + 1, len(offsets) - index)
        first = offsets[len(offsets) - moved]
        del offsets[len(offsets) - moved :]
        if index == len(offsets):
            self._runs.pop()  # nothing unread left in it
        span = [segment, None, first, moved]
        self._runs.append(span)
        self._tail = span
        self._streak = 0

    def push_front(self, positions: list[tuple[Segment, int]], nbytes: int) -> None:
        """Put items at the head, in order: ``positions`` are the (segment, offset) of their
        ADD records, ``nbytes`` their data bytes (the queue's newest in-memory items, which
        a lowered ``max_memory_size`` sends back to disk)."""
        runs: list[list] = []
        for segment, offset in positions:
            if runs and runs[-1][0] is segment:
                runs[-1][1].append(offset)
            else:
                runs.append([segment, array(_typecode(segment), (offset,)), 0, 0])
        self._runs.extendleft(reversed(runs))
        self.count += len(positions)
        self.nbytes += nbytes
        if self._tail is None:
            self._forget_tail()

    def extend(self, segment: Segment, offsets: array) -> int:
        """Push the items whose ADD records are at ``offsets`` (an array of 32- or 64-bit
        unsigned ints, in order) in ``segment``; returns their data bytes, read from the
        records' lengths (the pages that maps are dropped as it goes). Stretches of records
        back to back (a restart's backlog written past the memory budget) become spans, a
        window of offsets at a time; the rest stays offsets (``offsets`` itself, not a copy,
        when none is back to back and its type is the one ``segment`` takes). Raises
        ValueError (pushing nothing) at an offset holding no ADD record."""
        typecode = _typecode(segment)
        if offsets.typecode != typecode:
            # Narrowing for a segment of 4 GiB at most: every offset fits.
            offsets = low_halves(offsets) if offsets.typecode == _WIDE else array(typecode, offsets)
        n = len(offsets)
        nbytes = 0
        pieces: list[list] = []  # the runs to push, in order
        span_end = -1  # where the last piece, a span, ends
        for start in range(0, n, _EXTEND_STEP):
            stop = min(n, start + _EXTEND_STEP)
            window = _window(offsets, start, stop)
            try:
                nbytes += codec.add_data_bytes(segment.mm, window)
                walk = _span_window(segment, window[0], stop - start)
                try:
                    spanned = len(walk) > stop - start and walk[:-1].tobytes() == window.tobytes()
                    after = walk[-1]
                finally:
                    walk.release()
            finally:
                window.release()
            segment.drop_pages()
            if spanned and pieces and pieces[-1][1] is None and span_end == offsets[start]:
                pieces[-1][3] += stop - start
            elif spanned:
                pieces.append([segment, None, offsets[start], stop - start])
            elif pieces and pieces[-1][1] is not None:
                pieces[-1][1].extend(offsets[start:stop])
            else:
                whole = start == 0 and stop == n
                pieces.append([segment, offsets if whole else offsets[start:stop], 0, 0])
            span_end = after if spanned else -1
        tail = self._tail
        if pieces and tail is not None and tail[0] is segment:  # continue the tail run
            first = pieces[0]
            if first[1] is not None and tail[1] is not None:
                tail[1].extend(pieces.pop(0)[1])
            elif first[1] is None and tail[1] is None and first[2] == self._tail_end:
                tail[3] += pieces.pop(0)[3]
        self._runs.extend(pieces)
        self.count += n
        self.nbytes += nbytes
        if n:
            self._forget_tail()
            if span_end >= 0:
                self._tail_end = span_end
        return nbytes

    def take(self, max_bytes: int, cls, max_items: int = -1, first_max: int = -1) -> list:
        """Read the head items back, in order, as ``cls`` tuples or made by an ItemMaker (see
        codec.read_adds): as many as fit in ``max_bytes`` of data and, with ``max_items``
        >= 0, no more than that many; at least one if any remain, unless ``first_max`` >= 0
        and the first has more data than that. At a position without a valid ADD record
        (damaged on disk since it was written) it stops there: it returns the items read
        before it, or raises ValueError if it is the first, so that no item read is lost."""
        out: list = []
        runs = self._runs
        if first_max >= 0 and runs and self._head_bytes() > first_max:
            return out
        while runs:
            run = runs[0]
            segment, offsets, start = run[0], run[1], run[2]
            # Widen about what the budget takes at the mean item size, plus one so that
            # read_adds sees where the budget ends; a window that ends first means one more
            # turn, and the cap bounds the work wasted when the head items are larger.
            want = max(max_bytes, 0) // max(self.nbytes // self.count, 1) + 1
            width = min(max(want, _WINDOW[0]), _WINDOW[1])
            if max_items >= 0:
                width = min(width, max(max_items - len(out), 1))
            if offsets is None:
                left = run[3]
                width = min(width, left)
                window = _span_window(segment, start, width)
            else:
                left = len(offsets) - start
                width = min(width, left)
                window = _window(offsets, start, start + width)
            try:
                with window[:width] as items:
                    n, got, ok = codec.read_adds(segment.mm, items, 0, max_bytes, cls, out)
                last = window[n - 1] if n else 0
                bad = 0 if ok else window[n]
                after = window[n] if offsets is None and n < len(window) else 0
            finally:
                window.release()
            self.count -= n
            self.nbytes -= got
            max_bytes -= got
            self._read_since_drop += got
            if self._read_since_drop >= _DROP_STEP and n:
                # FIFO: the pages before the last item read are done with for now.
                self._read_since_drop = 0
                segment.drop_pages(0, last)
            if n == left and ok:
                runs.popleft()
                if not runs:
                    self._forget_tail()
                continue
            if offsets is None:
                run[2] = bad if not ok else after
                run[3] = left - n
            else:
                end = start + n
                if ok and end >= _TRIM_AT and end * 2 >= len(offsets):
                    del offsets[:end]
                    end = 0
                run[2] = end
            if not ok:
                if out:
                    return out
                raise ValueError(f"{segment.path}: no valid ADD record at offset {bad}")
            if n < width or max_bytes < 0 or 0 <= max_items <= len(out):
                break  # the budget is spent
        return out

    def _head_bytes(self) -> int:
        """The data bytes of the head item, from its record's length (ValueError if its
        position holds no ADD record)."""
        segment, offsets, start = self._runs[0][:3]
        if offsets is None:
            window = memoryview(array(_WIDE, (start,)))
        else:
            window = _window(offsets, start, start + 1)
        try:
            return codec.add_data_bytes(segment.mm, window)
        finally:
            window.release()

    def clear(self) -> None:
        self._runs.clear()
        self.count = 0
        self.nbytes = 0
        self._forget_tail()

    def segments(self) -> set[Segment]:
        """The segments that hold an unread item."""
        return {run[0] for run in self._runs}

    def runs(self) -> list[tuple[Segment, array | Span]]:
        """The unread positions, run by run, as of now (for a compaction snapshot, which reads
        them on its own thread meanwhile): an array's copied, a span's to be walked."""
        return [
            (run[0], Span(run[0], run[2], run[3]) if run[1] is None else run[1][run[2] :])
            for run in self._runs
        ]

    def replace_head(self, old: set[Segment], segment: Segment, offsets: array) -> None:
        """Compaction moved the items of the ``old`` segments, in order, to ``offsets`` in
        ``segment``. Items read since are gone from the head, so the unread ones are the
        last of ``offsets``; the runs in ``old`` segments are always a prefix of the FIFO."""
        runs = self._runs
        unread = 0
        while runs and runs[0][0] in old:
            _, offs, i, count = runs.popleft()
            unread += count if offs is None else len(offs) - i
        if unread:
            moved = offsets[len(offsets) - unread :]
            typecode = _typecode(segment)
            if moved.typecode != typecode:
                # Narrowing for a segment of 4 GiB at most: every offset fits.
                moved = low_halves(moved) if moved.typecode == _WIDE else array(typecode, moved)
            runs.appendleft([segment, moved, 0, 0])
        if not runs or runs[-1] is not self._tail:  # the tail was among those moved
            self._forget_tail()
