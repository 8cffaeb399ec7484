"""Where the not-in-memory (read-behind) items are: a FIFO of record positions.

Four bytes per item: the offsets of a run of consecutive items in the same segment sit in an
``array`` of 32-bit unsigned ints (8-byte ones only for a segment larger than 4 GiB), widened
to the 64-bit offsets ``codec.read_adds`` takes a window at a time, as they are read back.
Items enter at the tail (``push``, or ``extend`` for a run of them: recovery's) and are read
back from the head (``take``), in FIFO order, as the queue's head drains; nothing else ever
removes one (``clear`` is FLUSH). Items the queue held in memory enter at the head
(``push_front``) when a reload lowers its ``max_memory_size``.
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from typing import TYPE_CHECKING

from . import codec

if TYPE_CHECKING:
    from .segment import Segment

_TRIM_AT = 4096  # drop consumed offsets once this many and half the run are consumed
_DROP_STEP = 1 << 20  # unmap the pages read back every this many bytes
_WINDOW = (64, 4096)  # fewest and most offsets widened for one read_adds call
_EXTEND_STEP = 4096  # offsets whose lengths extend reads between two drops of mapped pages

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


class DiskItems:
    """FIFO of (segment, offset) positions of ADD records, with item and data-byte counts."""

    __slots__ = ("_runs", "count", "nbytes", "_read_since_drop")

    def __init__(self) -> None:
        # Each run: [segment, offsets, index of the next unread offset].
        self._runs: deque[list] = deque()
        self.count = 0
        self.nbytes = 0
        self._read_since_drop = 0  # data bytes read back since mapped pages were dropped

    def push(self, segment: Segment, offset: int, nbytes: int) -> None:
        runs = self._runs
        if runs and runs[-1][0] is segment:
            runs[-1][1].append(offset)
        else:
            offsets = array(_typecode(segment), (offset,))
            runs.append([segment, offsets, 0])
        self.count += 1
        self.nbytes += nbytes

    def push_front(self, positions: list[tuple[Segment, int]], nbytes: int) -> None:
        """Put items at the head, in order: ``positions`` are the (segment, offset) of their
        ADD records, ``nbytes`` their data bytes (the queue's newest in-memory items, which
        a lowered ``max_memory_size`` sends back to disk)."""
        runs: list[list] = []
        for segment, offset in positions:
            if runs and runs[-1][0] is segment:
                runs[-1][1].append(offset)
            else:
                runs.append([segment, array(_typecode(segment), (offset,)), 0])
        self._runs.extendleft(reversed(runs))
        self.count += len(positions)
        self.nbytes += nbytes

    def extend(self, segment: Segment, offsets: array) -> int:
        """Push the items whose ADD records are at ``offsets`` (an array of 32- or 64-bit
        unsigned ints, in order) in ``segment``; returns their data bytes, read from the
        records' lengths (the pages that maps are dropped as it goes). ``offsets`` is kept,
        not copied, when its type is the one ``segment`` takes. Raises ValueError (pushing
        nothing) at an offset holding no ADD record."""
        typecode = _typecode(segment)
        if offsets.typecode != typecode:
            # Narrowing for a segment of 4 GiB at most: every offset fits.
            offsets = low_halves(offsets) if offsets.typecode == _WIDE else array(typecode, offsets)
        n = len(offsets)
        nbytes = 0
        for start in range(0, n, _EXTEND_STEP):
            window = _window(offsets, start, min(n, start + _EXTEND_STEP))
            try:
                nbytes += codec.add_data_bytes(segment.mm, window)
            finally:
                window.release()
            segment.drop_pages()
        runs = self._runs
        if runs and runs[-1][0] is segment:
            runs[-1][1].extend(offsets)
        elif n:
            runs.append([segment, offsets, 0])
        self.count += n
        self.nbytes += nbytes
        return nbytes

    def take(self, max_bytes: int, cls, max_items: int = -1, first_max: int = -1) -> list:
        """Read the head items back, in order, as ``cls`` tuples or made by an ItemMaker (see
        codec.read_adds): as many as fit in ``max_bytes`` of data and, with ``max_items``
        >= 0, no more than that many; at least one if any remain, unless ``first_max`` >= 0
        and the first has more data than that. Raises ValueError (after taking what it read)
        at a position without a valid ADD record."""
        out: list = []
        runs = self._runs
        if first_max >= 0 and runs and self._head_bytes() > first_max:
            return out
        while runs:
            run = runs[0]
            segment, offsets, start = run
            # Widen about what the budget takes at the mean item size, plus one so that
            # read_adds sees where the budget ends; a window that ends first means one more
            # turn, and the cap bounds the work wasted when the head items are larger.
            want = max(max_bytes, 0) // max(self.nbytes // self.count, 1) + 1
            width = min(max(want, _WINDOW[0]), _WINDOW[1])
            if max_items >= 0:
                width = min(width, max(max_items - len(out), 1))
            stop = min(len(offsets), start + width)
            window = _window(offsets, start, stop)
            try:
                n, got, ok = codec.read_adds(segment.mm, window, 0, max_bytes, cls, out)
                last = window[n - 1] if n else 0
                bad = 0 if ok else window[n]
            finally:
                window.release()
            end = start + n
            self.count -= n
            self.nbytes -= got
            max_bytes -= got
            self._read_since_drop += got
            if self._read_since_drop >= _DROP_STEP and n:
                # FIFO: the pages before the last item read are done with for now.
                self._read_since_drop = 0
                segment.drop_pages(0, last)
            if not ok:
                run[2] = end
                raise ValueError(f"{segment.path}: no valid ADD record at offset {bad}")
            if end == len(offsets):
                runs.popleft()
                continue
            if end >= _TRIM_AT and end * 2 >= len(offsets):
                del offsets[:end]
                end = 0
            run[2] = end
            if n < stop - start or max_bytes < 0 or 0 <= max_items <= len(out):
                break  # the budget is spent
        return out

    def _head_bytes(self) -> int:
        """The data bytes of the head item, from its record's length (ValueError if its
        position holds no ADD record)."""
        segment, offsets, start = self._runs[0]
        window = _window(offsets, start, start + 1)
        try:
            return codec.add_data_bytes(segment.mm, window)
        finally:
            window.release()

    def clear(self) -> None:
        self._runs.clear()
        self.count = 0
        self.nbytes = 0

    def segments(self) -> set[Segment]:
        """The segments that hold an unread item."""
        return {run[0] for run in self._runs}

    def runs(self) -> list[tuple[Segment, array]]:
        """A copy of the unread positions, run by run (for a compaction snapshot)."""
        return [(segment, offsets[i:]) for segment, offsets, i in self._runs]

    def replace_head(self, old: set[Segment], segment: Segment, offsets: array) -> None:
        """Compaction moved the items of the ``old`` segments, in order, to ``offsets`` in
        ``segment``. Items read since are gone from the head, so the unread ones are the
        last of ``offsets``; the runs in ``old`` segments are always a prefix of the FIFO."""
        runs = self._runs
        unread = 0
        while runs and runs[0][0] in old:
            _, offs, i = runs.popleft()
            unread += len(offs) - i
        if unread:
            moved = offsets[len(offsets) - unread :]
            typecode = _typecode(segment)
            if moved.typecode != typecode:
                # Narrowing for a segment of 4 GiB at most: every offset fits.
                moved = low_halves(moved) if moved.typecode == _WIDE else array(typecode, moved)
            runs.appendleft([segment, moved, 0])
