"""Recovery's replay state: the pure-Python reference.

``erq/_fast/_replay.pyx`` is the C optimisation of this module; both export the same names with
the same behaviour (``erq.journal.codec`` picks one).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from itertools import compress, count, islice, repeat
from operator import ge, ne

from ._records_py import RecordIterator
from .format import (
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_REMOVE,
)

__all__ = ["ReplayTail", "replay_records"]

_TOMBSTONE = (1 << 64) - 1  # the position of a removed entry: no record is ever there
_U64_LIMIT = 1 << 64


class ReplayTail:
    """Recovery's queued ids in ADD order, each with the position of its ADD record: the
    replay state of a queue's tail in two arrays of unsigned 64-bit ints (16 bytes per entry)
    instead of a dict of Python ints (about 110).

    ``add`` appends an id that is not queued; ``pop`` removes one wherever it is and returns
    its position (None if it is not queued); ``in`` and ``len`` see the queued ids; iteration
    gives them in ADD order, ``items()`` with their positions; ``take_positions()`` hands the
    positions over (an ``array('Q')``, not copied) and empties the tail; ``clear()`` is FLUSH.

    A removed entry becomes a tombstone (position 2**64 - 1); ``_cursor`` is the first live
    entry, so removing the oldest (the FIFO common case) costs O(1). Another id is found by
    bisection in the runs of strictly increasing ids (one run for a journal written by one
    server, a few after a compaction snapshot that wrote the queue in its own order); past
    RUN_LIMIT runs a dict id -> index is built and kept up to date instead. An add first
    compacts the arrays when the tombstones number at least COMPACT_MIN and outnumber the
    live entries, so the arrays stay within about twice the live entries however often the
    queue drains and refills; when the last live entry goes the tail starts afresh.
    ``slots`` (entries held, tombstones included) and ``indexed`` show that bookkeeping.
    The C twin follows the same rules, so both report the same ``slots`` and ``indexed``.
    """

    __slots__ = ("_ids", "_positions", "_cursor", "_live", "_runs", "_index")

    RUN_LIMIT = 32
    COMPACT_MIN = 1024

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._ids = array("Q")  # ids in ADD order, removed ones too
        self._positions = array("Q")  # their ADD positions; _TOMBSTONE once removed
        self._cursor = 0  # the first live entry (len(_ids) when there is none)
        self._live = 0
        self._runs: list[int] = []  # starts of the strictly increasing runs; the first <= _cursor
        self._index: dict[int, int] | None = None  # id -> index of the live ids, past RUN_LIMIT

    def __len__(self) -> int:
        return self._live

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int) and 0 <= id < _U64_LIMIT and self._find(id) >= 0

    def __iter__(self):
        ids, positions = self._ids, self._positions
        for i in range(self._cursor, len(ids)):
            if positions[i] != _TOMBSTONE:
                yield ids[i]

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        ids, positions = self._ids, self._positions
        for i in range(self._cursor, len(ids)):
            if positions[i] != _TOMBSTONE:
                yield ids[i], positions[i]

    @property
    def slots(self) -> int:
        """Entries held in the arrays: the queued ids and the tombstones not compacted yet."""
        return len(self._ids)

    @property
    def indexed(self) -> bool:
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    def add(self, id: int, position: int) -> None:
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")
        if not 0 <= id < _U64_LIMIT or not 0 <= position < _U64_LIMIT:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        if position == _TOMBSTONE:
            raise ValueError("position 2**64 - 1 marks a removed entry")
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

    def take_positions(self) -> array:
        """The positions of the queued ids in ADD order, as an ``array('Q')``; the tail is
        left empty (its storage is handed over, not copied)."""
        self._squeeze()
        out = self._positions
        self._reset()
        return out

    # ---- internals (replay_records calls _find, _append and _pop_at) ----------------------
    def _find(self, id: int) -> int:
        """Index of the live entry of ``id``, or -1."""
        if not self._live:
            return -1
        if self._index is not None:
            return self._index.get(id, -1)
        ids = self._ids
        cursor = self._cursor
        if ids[cursor] == id:
            return cursor
        runs = self._runs
        last = len(runs) - 1
        for k, start in enumerate(runs):
            end = runs[k + 1] if k < last else len(ids)
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            if id < ids[lo] or id > ids[end - 1]:
                continue
            i = bisect_left(ids, id, lo, end)
            if ids[i] == id and self._positions[i] != _TOMBSTONE:
                return i
        return -1

    def _append(self, id: int, position: int) -> None:
        """Add an entry for ``id``, which the caller knows is not queued."""
        n = len(self._ids)
        dead = n - self._live
        if dead >= self.COMPACT_MIN and dead > self._live:
            self._compact()
            n = len(self._ids)
        ids = self._ids
        if not n:
            self._runs = [0]
        elif self._index is None and id <= ids[n - 1]:
            self._new_run(n)
        ids.append(id)
        self._positions.append(position)
        self._live += 1
        if self._index is not None:
            self._index[id] = n

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
        ids, positions = self._ids, self._positions
        self._index = {
            ids[i]: i for i in range(self._cursor, len(ids)) if positions[i] != _TOMBSTONE
        }
        self._runs = []

    def _pop_at(self, i: int, id: int) -> int:
        positions = self._positions
        position = positions[i]
        positions[i] = _TOMBSTONE
        self._live -= 1
        if not self._live:
            self._reset()
            return position
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while positions[i] == _TOMBSTONE:  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return position

    def _squeeze(self) -> None:
        """Move the live entries to the front, in order, dropping every tombstone."""
        ids, positions, cursor = self._ids, self._positions, self._cursor
        if len(ids) - cursor == self._live:  # no tombstone after the cursor
            del ids[:cursor]
            del positions[:cursor]
        else:
            keep = list(map(ne, islice(positions, cursor, None), repeat(_TOMBSTONE)))
            self._ids = array("Q", compress(islice(ids, cursor, None), keep))
            self._positions = array("Q", compress(islice(positions, cursor, None), keep))
        self._cursor = 0

    def _compact(self) -> None:
        self._squeeze()
        ids = self._ids
        # Where ids[i] <= ids[i - 1] a run starts: at most RUN_LIMIT runs, or the index.
        breaks = list(
            islice(compress(count(1), map(ge, ids, islice(ids, 1, None))), self.RUN_LIMIT)
        )
        if len(breaks) < self.RUN_LIMIT:
            self._runs = [0, *breaks]
            self._index = None
        else:
            self._build_index()


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
