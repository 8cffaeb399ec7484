"""Recovery's replay state: the pure-Python reference.

``erq/_fast/_replay.pyx`` is the C optimisation of this module; both export the same names with
the same behaviour (``erq.journal.codec`` picks one).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

from ._records_py import RecordIterator
from .format import (
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_REMOVE,
)

__all__ = ["ReplayTail", "replay_records"]

_U64_LIMIT = 1 << 64
_LOW_MASK = (1 << 32) - 1
_U32 = "I" if array("I").itemsize == 4 else "L"  # the C type of 32 bits


class ReplayTail:
    """Recovery's queued ids in ADD order, each with the position of its ADD record, in about
    4 bytes per entry (a dict of Python ints would take about 110): what a restart over tens
    of millions of queued items holds while it replays, beside what it will keep.

    ``add`` appends an id that is not queued; ``pop`` removes one wherever it is and returns
    its position (None if it is not queued); ``in`` and ``len`` see the queued ids; iteration
    gives them in ADD order, ``items()`` with their positions; ``take_offsets(shift)`` hands
    the positions over, grouped, and empties the tail; ``clear()`` is FLUSH.

    The storage of entry ``i`` (``slots`` entries, removed ones too):

    - the low 32 bits of its position, in a 32-bit array; the high bits are kept once for
      each stretch of entries that share them (recovery's positions, ``segment << 40 |
      offset``, met in journal order: one stretch a segment, or one per 4 GiB of one);
    - its id, not stored: ids come in runs that go up by one (a journal's ADDs, in the order
      the queue numbered them), each kept as its first entry and first id;
    - one bit: set once the entry is removed (a tombstone).

    ``_cursor`` is the first live entry, so removing the oldest (the FIFO common case) costs
    O(1) but for finding its id run. Another id is found by bisection in the runs of strictly
    increasing ids (one run for a journal written by one server, a few after a compaction
    snapshot that wrote the queue in its own order); past RUN_LIMIT runs a dict id -> index is
    built and kept up to date instead. An add first compacts the entries when the tombstones
    number at least COMPACT_MIN and outnumber the live entries, so they stay within about
    twice the live entries however often the queue drains and refills; when the last live
    entry goes the tail starts afresh. ``slots``, ``indexed`` and ``nbytes`` (the storage,
    by the layout above) show that bookkeeping; the C twin follows the same rules, so both
    report the same.
    """

    __slots__ = (
        "_low",
        "_dead",
        "_id_at",
        "_id_first",
        "_high_at",
        "_high",
        "_n",
        "_cursor",
        "_live",
        "_runs",
        "_index",
    )

    RUN_LIMIT = 32
    COMPACT_MIN = 1024

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._low = array(_U32)  # the low 32 bits of each entry's position
        self._dead = bytearray()  # bit i & 7 of byte i >> 3: entry i is removed
        self._id_at = array("Q")  # the first entry of each id run ...
        self._id_first = array("Q")  # ... and its id; the next entries' go up by one
        self._high_at = array("Q")  # the first entry of each stretch of equal high bits ...
        self._high = array("Q")  # ... and those bits (position >> 32)
        self._n = 0  # entries held, removed ones too
        self._cursor = 0  # the first live entry (_n when there is none)
        self._live = 0
        self._runs: list[int] = []  # starts of the strictly increasing runs; the first <= _cursor
        self._index: dict[int, int] | None = None  # id -> index of the live ids, past RUN_LIMIT

    def __len__(self) -> int:
        return self._live

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int) and 0 <= id < _U64_LIMIT and self._find(id) >= 0

    def __iter__(self):
        for _, id, _ in self._entries(self._cursor):
            yield id

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        for _, id, position in self._entries(self._cursor):
            yield id, position

    @property
    def slots(self) -> int:
        """Entries held: the queued ids and the tombstones not compacted yet."""
        return self._n

    @property
    def indexed(self) -> bool:
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    @property
    def nbytes(self) -> int:
        """The bytes the entries take: 4 for each position's low bits, a bit for each
        tombstone mark, 16 for each id run and each stretch of high bits (not the index)."""
        return 4 * self._n + (self._n + 7 >> 3) + 16 * (len(self._id_at) + len(self._high_at))

    def add(self, id: int, position: int) -> None:
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")
        if not 0 <= id < _U64_LIMIT or not 0 <= position < _U64_LIMIT:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        if self._find(id) >= 0:
            raise ValueError(f"id {id} is already queued")
        self._append(id, position)

    def pop(self, id: int) -> int | None:
        """Remove ``id``; its position, or None if it was not queued."""
        if not isinstance(id, int) or not 0 <= id < _U64_LIMIT:
            return None
        i = self._find(id)
        return None if i < 0 else self._pop_at(i, id)

    def clear(self) -> None:
        self._reset()

    def take_offsets(self, shift: int) -> list[tuple[int, array]]:
        """Hand the positions of the queued ids over, in ADD order, and leave the tail empty.
        A position is ``group << shift | offset`` (32 <= shift <= 64): the result is a list
        of (group, offsets), one for each stretch of positions in one group, the offsets in a
        32-bit array where they all fit, else a 64-bit one. The tail's storage shrinks as
        the stretches are copied out, from the newest, so the two are never both whole."""
        if not isinstance(shift, int):
            raise TypeError("an integer is required")
        if not 32 <= shift <= 64:
            raise ValueError("shift must be from 32 to 64")
        self._squeeze()
        sub = shift - 32
        sub_mask = (1 << sub) - 1
        low, high_at, high = self._low, self._high_at, self._high
        pieces: list[tuple[int, array]] = []
        end = self._n
        k = len(high_at) - 1
        while k >= 0:
            group = high[k] >> sub
            j = k
            while j > 0 and high[j - 1] >> sub == group:
                j -= 1
            start = high_at[j]
            if not any(high[h] & sub_mask for h in range(j, k + 1)):
                offsets = low[start:end]
            else:
                offsets = array("Q")
                for h in range(j, k + 1):
                    top = (high[h] & sub_mask) << 32
                    stop = high_at[h + 1] if h < k else end
                    offsets.extend(top | low[i] for i in range(high_at[h], stop))
            del low[start:]
            pieces.append((group, offsets))
            end, k = start, j - 1
        pieces.reverse()
        self._reset()
        return pieces

    # ---- internals (replay_records calls _find, _append and _pop_at) ----------------------
    def _id_of(self, i: int) -> int:
        r = bisect_right(self._id_at, i) - 1
        return self._id_first[r] + i - self._id_at[r]

    def _position_of(self, i: int) -> int:
        return self._high[bisect_right(self._high_at, i) - 1] << 32 | self._low[i]

    def _entries(self, i: int):
        """(index, id, position) of the live entries from ``i`` on, in order."""
        yield from _live_entries(
            self._low, self._dead, self._n, self._id_at, self._id_first, self._high_at,
            self._high, i,
        )  # fmt: skip

    def _find(self, id: int) -> int:
        """Index of the live entry of ``id``, or -1."""
        if not self._live:
            return -1
        if self._index is not None:
            return self._index.get(id, -1)
        cursor = self._cursor
        if self._id_of(cursor) == id:
            return cursor
        id_at, id_first, dead = self._id_at, self._id_first, self._dead
        nruns = len(id_at)
        runs = self._runs
        last = len(runs) - 1
        for k, start in enumerate(runs):
            end = runs[k + 1] if k < last else self._n
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            r = bisect_right(id_at, lo) - 1
            if id < id_first[r] + lo - id_at[r]:
                continue  # below the run's first id
            # The id run that would hold it: the last one from r whose first id is <= id (the
            # runs of this stretch go up, ids strictly increasing within it).
            r = bisect_right(id_first, id, r + 1, bisect_right(id_at, end - 1, r)) - 1
            i = id_at[r] + id - id_first[r]
            within = i < end and (r + 1 == nruns or i < id_at[r + 1])
            if within and not dead[i >> 3] >> (i & 7) & 1:
                return i
        return -1

    def _append(self, id: int, position: int) -> None:
        """Add an entry for ``id``, which the caller knows is not queued."""
        n = self._n
        dead = n - self._live
        if dead >= self.COMPACT_MIN and dead > self._live:
            self._compact()
            n = self._n
        if not n:
            self._runs = [0]
            self._put(id, position, -1)
        else:
            previous = self._id_first[-1] + n - 1 - self._id_at[-1]  # the last run's last
            if self._index is None and id <= previous:
                self._new_run(n)
            self._put(id, position, previous)
        self._live += 1
        if self._index is not None:
            self._index[id] = n

    def _put(self, id: int, position: int, previous: int) -> None:
        """Store entry ``_n`` (``previous``: the id of the entry before it, -1 if none)."""
        n = self._n
        if id != previous + 1 or previous < 0:
            self._id_at.append(n)
            self._id_first.append(id)
        high = position >> 32
        if not n or high != self._high[-1]:
            self._high_at.append(n)
            self._high.append(high)
        self._low.append(position & _LOW_MASK)
        if not n & 7:
            self._dead.append(0)
        self._n = n + 1

    def _new_run(self, start: int) -> None:
        runs, cursor = self._runs, self._cursor
        k = 0
        while k + 1 < len(runs) and runs[k + 1] <= cursor:  # runs wholly removed
            k += 1
        del runs[:k]
        if len(runs) < self.RUN_LIMIT:
            runs.append(start)
        else:
            self._build_index()

    def _build_index(self) -> None:
        self._index = {id: i for i, id, _ in self._entries(self._cursor)}
        self._runs = []

    def _pop_at(self, i: int, id: int) -> int:
        position = self._position_of(i)
        dead = self._dead
        dead[i >> 3] |= 1 << (i & 7)
        self._live -= 1
        if not self._live:
            self._reset()
            return position
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while dead[i >> 3] >> (i & 7) & 1:  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return position

    def _squeeze(self) -> None:
        """Move the live entries to the front, in order, dropping every tombstone."""
        cursor, n = self._cursor, self._n
        if n - cursor == self._live:  # no tombstone after the cursor: drop the prefix
            if cursor:
                del self._low[:cursor]
                self._dead = bytearray(n - cursor + 7 >> 3)
                self._id_at, self._id_first = _cut(self._id_at, self._id_first, cursor, True)
                self._high_at, self._high = _cut(self._high_at, self._high, cursor, False)
                self._n = n - cursor
        else:
            # Walked from the old arrays as the new ones fill: no object held per entry.
            entries = _live_entries(
                self._low, self._dead, n, self._id_at, self._id_first, self._high_at,
                self._high, cursor,
            )  # fmt: skip
            self._reset()
            previous = -1
            for _, id, position in entries:
                self._put(id, position, previous)
                previous = id
            self._live = self._n
        self._cursor = 0

    def _compact(self) -> None:
        self._squeeze()
        # Ids go up by one within an id run, so a run of strictly increasing ids can only
        # start where an id run does: where its first id is not above the last one before.
        id_at, id_first = self._id_at, self._id_first
        runs = [0]
        for r in range(1, len(id_at)):
            if id_first[r] <= id_first[r - 1] + id_at[r] - id_at[r - 1] - 1:
                if len(runs) == self.RUN_LIMIT:
                    self._build_index()
                    return
                runs.append(id_at[r])
        self._runs = runs
        self._index = None


def _live_entries(low, dead, n, id_at, id_first, high_at, high, i):
    """(index, id, position) of the live entries from ``i`` on, in order, walking the id runs
    and the stretches of high bits beside the entries (the arrays are bound at the call)."""
    r = bisect_right(id_at, i) - 1
    k = bisect_right(high_at, i) - 1
    while i < n:
        while r + 1 < len(id_at) and id_at[r + 1] <= i:
            r += 1
        while k + 1 < len(high_at) and high_at[k + 1] <= i:
            k += 1
        if not dead[i >> 3] >> (i & 7) & 1:
            yield i, id_first[r] + i - id_at[r], high[k] << 32 | low[i]
        i += 1


def _cut(starts: array, values: array, cursor: int, counting: bool) -> tuple[array, array]:
    """The runs ``starts``/``values`` (entry where each starts, and its value) of the entries
    from ``cursor`` on, renumbered from 0; ``counting``: a run's value goes up by one an entry
    (an id run), so the run that ``cursor`` falls in starts at its value there."""
    r = bisect_right(starts, cursor) - 1
    first = values[r] + (cursor - starts[r] if counting else 0)
    new_starts = array("Q", [0])
    new_starts.extend(start - cursor for start in starts[r + 1 :])
    new_values = array("Q", [first])
    new_values.extend(values[r + 1 :])
    return new_starts, new_values


def replay_records(
    buffer,
    start: int,
    end: int,
    base: int,
    tail: ReplayTail,
    head: dict,
    opened: dict,
    max_id: int,
    duplicates: list,
) -> tuple[int, int, int]:
    """Apply the valid records from ``start`` to recovery's replay state; stop at the first
    position that is not a valid record. Returns (status, that position, greatest id seen).

    ``tail`` (this module's ReplayTail) holds the queued ids in ADD order with ``base +
    offset`` of their ADD; ``head`` maps the ids put back by UNREMOVE to theirs (the queue
    order is its reverse insertion order); ``opened`` the open reads, in OPEN order. An ADD
    of an id already live is not applied; its offset goes to ``duplicates``. Ids never seen
    are ignored.
    """
    if not isinstance(tail, ReplayTail):
        raise TypeError(f"tail must be a ReplayTail, not {type(tail).__name__}")
    find, pop_at = tail._find, tail._pop_at
    records = RecordIterator(buffer, start, end, False)
    for pos, op, id, _, _, _, _ in records:
        if op == OP_FLUSH:
            tail.clear()
            head.clear()
            continue
        if op == OP_ADD:
            if id <= max_id and (find(id) >= 0 or id in head or id in opened):
                duplicates.append(pos)
            else:
                tail._append(id, base + pos)
        elif op == OP_REMOVE:
            i = find(id)
            if i >= 0:
                pop_at(i, id)
            elif head.pop(id, None) is None:
                opened.pop(id, None)
        elif op == OP_OPEN:
            i = find(id)
            value = pop_at(i, id) if i >= 0 else head.pop(id, None)
            if value is not None:
                opened[id] = value
        elif op == OP_CONFIRM:
            opened.pop(id, None)
        else:  # OP_UNREMOVE
            value = opened.pop(id, None)
            if value is not None:
                head[id] = value
        if id > max_id:
            max_id = id
    return records.status, records.position, max_id
