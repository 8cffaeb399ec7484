"""Where the not-in-memory (read-behind) items are: a FIFO of record positions.

Only 8 bytes per item: offsets in an ``array('Q')`` per run of consecutive items in the same
segment. Items enter at the tail (``push``) and are read back from the head (``take``), in
FIFO order, as the queue's head drains; nothing else ever removes one (``clear`` is FLUSH).
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import TYPE_CHECKING

from . import codec

if TYPE_CHECKING:
    from .segment import Segment

_TRIM_AT = 4096  # drop consumed offsets once this many and half the run are consumed
_DROP_STEP = 1 << 20  # unmap the pages read back every this many bytes


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
            runs.append([segment, array("Q", (offset,)), 0])
        self.count += 1
        self.nbytes += nbytes

    def take(self, max_bytes: int, cls: type) -> list:
        """Read the head items back, in order, as ``cls`` tuples (see codec.read_adds): as
        many as fit in ``max_bytes`` of data, and at least one if any remain. Raises
        ValueError (after taking what it read) at a position without a valid ADD record."""
        out: list = []
        runs = self._runs
        while runs:
            run = runs[0]
            segment, offsets, start = run
            end, got, ok = codec.read_adds(segment.mm, offsets, start, max_bytes, cls, out)
            self.count -= end - start
            self.nbytes -= got
            max_bytes -= got
            self._read_since_drop += got
            if self._read_since_drop >= _DROP_STEP and end > start:
                # FIFO: the pages before the last item read are done with for now.
                self._read_since_drop = 0
                segment.drop_pages(0, offsets[end - 1])
            if not ok:
                run[2] = end
                raise ValueError(f"{segment.path}: no valid ADD record at offset {offsets[end]}")
            if end == len(offsets):
                runs.popleft()
                continue
            if end >= _TRIM_AT and end * 2 >= len(offsets):
                del offsets[:end]
                end = 0
            run[2] = end
            break  # the budget is spent
        return out

    def clear(self) -> None:
        self._runs.clear()
        self.count = 0
        self.nbytes = 0

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
            runs.appendleft([segment, offsets[len(offsets) - unread :], 0])
