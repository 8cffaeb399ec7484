# cython: language_level=3
"""Recovery's replay state: the queued ids of a queue's tail and the loop that applies a
segment's records to it. The C twin of erq/journal/_replay_py.py (same names, same
behaviour; the pure-Python module is the reference).
"""

cimport cython
from cpython.array cimport array, clone, resize_smart
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint64_t
from libc.string cimport memmove

from erq._fast._records cimport (
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_REMOVE,
    REC_VALID,
    _bounds,
    _check,
    erq_load64,
)


# The position of a removed ReplayTail entry: no record is ever there.
cdef uint64_t TOMBSTONE = 0xFFFFFFFFFFFFFFFF
# ReplayTail.COMPACT_MIN: the tombstones that an add compacts once they outnumber live entries.
cdef enum:
    REPLAY_COMPACT_MIN = 1024
cdef array _U64 = array("Q")  # the template of ReplayTail's arrays


cdef class ReplayTail:
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
    The pure twin follows the same rules, so both report the same ``slots`` and ``indexed``.
    """

    RUN_LIMIT = REPLAY_RUN_LIMIT
    COMPACT_MIN = REPLAY_COMPACT_MIN

    def __cinit__(self):
        self._reset()

    cdef int _reset(self) except -1:
        self._ids = clone(_U64, 0, False)
        self._positions = clone(_U64, 0, False)
        self._n = self._cursor = self._live = self._nruns = 0
        self._index = None
        return 0

    def __len__(self):
        return self._live

    def __contains__(self, id):
        if not isinstance(id, int) or id < 0 or id > TOMBSTONE:
            return False
        return self._find(id) >= 0

    def __iter__(self):
        # Index by index through the current arrays: no stale pointer if the tail changes.
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                yield self._ids.data.as_ulonglongs[i]
            i += 1

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                yield self._ids.data.as_ulonglongs[i], self._positions.data.as_ulonglongs[i]
            i += 1

    @property
    def slots(self):
        """Entries held in the arrays: the queued ids and the tombstones not compacted yet."""
        return self._n

    @property
    def indexed(self):
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    def add(self, id, position):
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        cdef uint64_t key, value
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")  # not truncated, as a float would be
        if id < 0 or position < 0 or id > TOMBSTONE or position > TOMBSTONE:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        key, value = id, position
        if value == TOMBSTONE:
            raise ValueError("position 2**64 - 1 marks a removed entry")
        if self._find(key) >= 0:
            raise ValueError(f"id {id} is already queued")
        self._append(key, value)

    def pop(self, id):
        """Remove ``id``; its position, or None if it was not queued."""
        cdef Py_ssize_t i
        cdef uint64_t position
        if not isinstance(id, int) or id < 0 or id > TOMBSTONE:
            return None
        i = self._find(id)
        if i < 0:
            return None
        self._pop_at(i, id, &position)
        return position

    def clear(self):
        self._reset()

    def take_positions(self):
        """The positions of the queued ids in ADD order, as an ``array('Q')``; the tail is
        left empty (its storage is handed over, not copied)."""
        self._squeeze()
        out = self._positions
        self._reset()
        return out

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _find(self, uint64_t id) except -2:
        """Index of the live entry of ``id``, or -1."""
        cdef const unsigned long long *ids
        cdef const unsigned long long *positions
        cdef Py_ssize_t cursor = self._cursor, k, start, end, lo, hi, mid
        cdef object found
        if self._live == 0:
            return -1
        if self._index is not None:
            found = self._index.get(id)
            return -1 if found is None else <Py_ssize_t>found
        ids = self._ids.data.as_ulonglongs
        if ids[cursor] == id:
            return cursor
        positions = self._positions.data.as_ulonglongs
        for k in range(self._nruns):
            start = self._runs[k]
            end = self._runs[k + 1] if k + 1 < self._nruns else self._n
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            if id < ids[lo] or id > ids[end - 1]:
                continue
            hi = end
            while lo < hi:  # bisect_left: ids[end - 1] >= id, so lo < end
                mid = lo + ((hi - lo) >> 1)
                if ids[mid] < id:
                    lo = mid + 1
                else:
                    hi = mid
            if ids[lo] == id and positions[lo] != TOMBSTONE:
                return lo
        return -1

    cdef int _append(self, uint64_t id, uint64_t position) except -1:
        """Add an entry for ``id``, which the caller knows is not queued."""
        cdef Py_ssize_t n = self._n
        cdef Py_ssize_t dead = n - self._live
        if dead >= REPLAY_COMPACT_MIN and dead > self._live:
            self._compact()
            n = self._n
        if n == 0:
            self._runs[0] = 0
            self._nruns = 1
        elif self._index is None and id <= self._ids.data.as_ulonglongs[n - 1]:
            self._new_run(n)
        resize_smart(self._ids, n + 1)
        resize_smart(self._positions, n + 1)
        self._ids.data.as_ulonglongs[n] = id
        self._positions.data.as_ulonglongs[n] = position
        self._n = n + 1
        self._live += 1
        if self._index is not None:
            self._index[id] = n
        return 0

    cdef int _new_run(self, Py_ssize_t start) except -1:
        cdef Py_ssize_t k = 0
        while k + 1 < self._nruns and self._runs[k + 1] <= self._cursor:  # runs wholly removed
            k += 1
        if k:
            memmove(self._runs, self._runs + k, (self._nruns - k) * sizeof(Py_ssize_t))
            self._nruns -= k
        if self._nruns < REPLAY_RUN_LIMIT:
            self._runs[self._nruns] = start
            self._nruns += 1
        else:
            self._build_index()
        return 0

    cdef int _build_index(self) except -1:
        cdef dict index = {}
        cdef Py_ssize_t i
        for i in range(self._cursor, self._n):
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                index[self._ids.data.as_ulonglongs[i]] = i
        self._index = index
        self._nruns = 0
        return 0

    cdef int _pop_at(self, Py_ssize_t i, uint64_t id, uint64_t *position) except -1:
        cdef unsigned long long *positions = self._positions.data.as_ulonglongs
        position[0] = positions[i]
        positions[i] = TOMBSTONE
        self._live -= 1
        if self._live == 0:
            self._reset()
            return 0
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while positions[i] == TOMBSTONE:  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return 0

    cdef int _squeeze(self) except -1:
        """Move the live entries to the front, in order, dropping every tombstone."""
        cdef unsigned long long *ids = self._ids.data.as_ulonglongs
        cdef unsigned long long *positions = self._positions.data.as_ulonglongs
        cdef Py_ssize_t i, j = 0
        for i in range(self._cursor, self._n):
            if positions[i] != TOMBSTONE:
                ids[j] = ids[i]
                positions[j] = positions[i]
                j += 1
        self._n = j
        self._cursor = 0
        resize_smart(self._ids, j)
        resize_smart(self._positions, j)
        return 0

    cdef int _compact(self) except -1:
        cdef const unsigned long long *ids
        cdef Py_ssize_t i
        self._squeeze()
        ids = self._ids.data.as_ulonglongs
        # Where ids[i] <= ids[i - 1] a run starts: at most RUN_LIMIT runs, or the index.
        self._runs[0] = 0
        self._nruns = 1
        self._index = None
        for i in range(1, self._n):
            if ids[i] <= ids[i - 1]:
                if self._nruns == REPLAY_RUN_LIMIT:
                    self._build_index()
                    return 0
                self._runs[self._nruns] = i
                self._nruns += 1
        return 0


def replay_records(buffer, Py_ssize_t start, Py_ssize_t end, uint64_t base,
                   ReplayTail tail not None, dict head, dict opened, uint64_t max_id,
                   list duplicates):
    """Apply the valid records from ``start`` to recovery's replay state; stop at the first
    position that is not a valid record. Returns (status, that position, greatest id seen).

    ``tail`` (this module's ReplayTail) holds the queued ids in ADD order with ``base +
    offset`` of their ADD; ``head`` maps the ids put back by UNREMOVE to theirs (the queue
    order is its reverse insertion order); ``opened`` the open reads, in OPEN order. An ADD
    of an id already live is not applied; its offset goes to ``duplicates``. Ids never seen
    are ignored.
    """
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef Py_ssize_t pos = start
    cdef Py_ssize_t nxt, i
    cdef int status, op
    cdef uint64_t id, position
    cdef object key, value
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, start, end)
        buf = <const unsigned char *>view.buf
        while True:
            status = _check(buf, pos, end, &nxt)
            if status != REC_VALID:
                break
            op = buf[pos + 8]
            if op == OP_FLUSH:
                tail._reset()
                head.clear()
                pos = nxt
                continue
            id = erq_load64(buf + pos + 9)
            # Python ints are made only for head and opened: the tail's common case (an ADD
            # of a new id, the removal of the oldest) makes no object at all.
            if op == OP_ADD:
                if id <= max_id and (tail._find(id) >= 0 or id in head or id in opened):
                    duplicates.append(pos)
                else:
                    tail._append(id, base + <uint64_t>pos)
            elif op == OP_REMOVE:
                i = tail._find(id)
                if i >= 0:
                    tail._pop_at(i, id, &position)
                else:
                    key = id
                    if head.pop(key, None) is None:
                        opened.pop(key, None)
            elif op == OP_OPEN:
                i = tail._find(id)
                if i >= 0:
                    tail._pop_at(i, id, &position)
                    opened[id] = position
                else:
                    key = id
                    value = head.pop(key, None)
                    if value is not None:
                        opened[key] = value
            elif op == OP_CONFIRM:
                if opened:
                    opened.pop(id, None)
            else:  # OP_UNREMOVE
                value = opened.pop(id, None)
                if value is not None:
                    head[id] = value
            if id > max_id:
                max_id = id
            pos = nxt
    finally:
        PyBuffer_Release(&view)
    return (status, pos, max_id)
