# cython: language_level=3
"""Recovery's replay state: the queued ids of a queue's tail and the loop that applies a
segment's records to it. The C twin of erq/journal/_replay_py.py (same names, same
behaviour; the pure-Python module is the reference).
"""

cimport cython
from cpython.array cimport array, clone, resize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport Py_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove

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


# ReplayTail.COMPACT_MIN: the tombstones that an add compacts once they outnumber live entries.
cdef enum:
    REPLAY_COMPACT_MIN = 1024
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef array _U64 = array("Q")  # the templates of ReplayTail's arrays
cdef array _U32 = array("I" if array("I").itemsize == 4 else "L")
cdef array _U8 = array("B")


cdef inline int _room(array a, Py_ssize_t n) except -1:
    """Let ``a`` hold ``n`` items (its length is its room): an eighth more when it grows."""
    if Py_SIZE(a) < n:
        resize(a, n + (n >> 3) + 16)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _bisect_right(const unsigned long long *a, Py_ssize_t lo, Py_ssize_t hi,
                                     uint64_t x) noexcept:
    cdef Py_ssize_t mid
    while lo < hi:
        mid = lo + ((hi - lo) >> 1)
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef inline bint _is_dead(const unsigned char *dead, Py_ssize_t i) noexcept:
    return (dead[i >> 3] >> (i & 7)) & 1


cdef class ReplayTail:
    """Recovery's queued ids in ADD order, each with the position of its ADD record, in about
    4 bytes per entry (a dict of Python ints would take about 110): what a restart over tens
    of millions of queued items holds while it replays, beside what it will keep.

    ``add`` appends an id that is not queued; ``pop`` removes one wherever it is and returns
    its position (None if it is not queued); ``in`` and ``len`` see the queued ids; iteration
    gives them in ADD order, ``items()`` with their positions; ``take_offsets(shift)`` hands
    the positions over, grouped, and empties the tail; ``clear()`` is FLUSH.

    The storage of an entry: the low 32 bits of its position (the high bits once for each
    stretch of entries that share them); its id, not stored (ids come in runs that go up by
    one, each kept as its first entry and first id); one bit, set once it is removed (a
    tombstone). ``_cursor`` is the first live entry, so removing the oldest (the FIFO common
    case) costs O(1) but for finding its id run. Another id is found by bisection in the runs
    of strictly increasing ids (one run for a journal written by one server, a few after a
    compaction snapshot that wrote the queue in its own order); past RUN_LIMIT runs a dict
    id -> index is built and kept up to date instead. An add first compacts the entries when
    the tombstones number at least COMPACT_MIN and outnumber the live entries; when the last
    live entry goes the tail starts afresh. ``slots``, ``indexed`` and ``nbytes`` show that
    bookkeeping; the pure twin (the reference) follows the same rules, so both report the
    same.
    """

    RUN_LIMIT = REPLAY_RUN_LIMIT
    COMPACT_MIN = REPLAY_COMPACT_MIN

    def __cinit__(self):
        self._reset()

    cdef int _reset(self) except -1:
        self._low = clone(_U32, 0, False)
        self._dead = clone(_U8, 0, False)
        self._id_at = clone(_U64, 0, False)
        self._id_first = clone(_U64, 0, False)
        self._high_at = clone(_U64, 0, False)
        self._high = clone(_U64, 0, False)
        self._n = self._nid = self._nhigh = self._cursor = self._live = self._nruns = 0
        self._index = None
        return 0

    def __len__(self):
        return self._live

    def __contains__(self, id):
        if not isinstance(id, int) or id < 0 or id > U64_MAX:
            return False
        return self._find(id) >= 0

    def __iter__(self):
        # Index by index through the current arrays: no stale pointer if the tail changes.
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if not _is_dead(self._dead.data.as_uchars, i):
                yield self._id_of(i)
            i += 1

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if not _is_dead(self._dead.data.as_uchars, i):
                yield self._id_of(i), self._position_of(i)
            i += 1

    @property
    def slots(self):
        """Entries held: the queued ids and the tombstones not compacted yet."""
        return self._n

    @property
    def indexed(self):
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    @property
    def nbytes(self):
        """The bytes the entries take: 4 for each position's low bits, a bit for each
        tombstone mark, 16 for each id run and each stretch of high bits (not the index)."""
        return 4 * self._n + ((self._n + 7) >> 3) + 16 * (self._nid + self._nhigh)

    def add(self, id, position):
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        cdef uint64_t key, value
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")  # not truncated, as a float would be
        if id < 0 or position < 0 or id > U64_MAX or position > U64_MAX:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        key, value = id, position
        if self._find(key) >= 0:
            raise ValueError(f"id {id} is already queued")
        self._append(key, value)

    def pop(self, id):
        """Remove ``id``; its position, or None if it was not queued."""
        cdef Py_ssize_t i
        cdef uint64_t position
        if not isinstance(id, int) or id < 0 or id > U64_MAX:
            return None
        i = self._find(id)
        if i < 0:
            return None
        self._pop_at(i, id, &position)
        return position

    def clear(self):
        self._reset()

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def take_offsets(self, int shift):
        """Hand the positions of the queued ids over, in ADD order, and leave the tail empty.
        A position is ``group << shift | offset`` (32 <= shift <= 64): the result is a list
        of (group, offsets), one for each stretch of positions in one group, the offsets in a
        32-bit array where they all fit, else a 64-bit one. The tail's storage shrinks as
        the stretches are copied out, from the newest, so the two are never both whole."""
        cdef Py_ssize_t end, start, j, k, h, stop, i, o
        cdef uint64_t group, top, sub_mask
        cdef int sub = shift - 32
        cdef bint narrow
        cdef array offsets
        cdef const unsigned long long *high_at
        cdef const unsigned long long *high
        cdef list pieces = []
        if not 32 <= shift <= 64:
            raise ValueError("shift must be from 32 to 64")
        self._squeeze()
        sub_mask = (<uint64_t>1 << sub) - 1 if sub < 64 else U64_MAX
        high_at = self._high_at.data.as_ulonglongs
        high = self._high.data.as_ulonglongs
        end = self._n
        k = self._nhigh - 1
        while k >= 0:
            group = high[k] >> sub if sub < 64 else 0
            j = k
            narrow = (high[k] & sub_mask) == 0
            while j > 0 and (high[j - 1] >> sub if sub < 64 else 0) == group:
                j -= 1
                narrow = narrow and (high[j] & sub_mask) == 0
            start = <Py_ssize_t>high_at[j]
            if narrow:
                offsets = clone(_U32, end - start, False)
                memcpy(offsets.data.as_uints, self._low.data.as_uints + start,
                       (end - start) * sizeof(unsigned int))
            else:
                offsets = clone(_U64, end - start, False)
                o = 0
                for h in range(j, k + 1):
                    top = (high[h] & sub_mask) << 32
                    stop = <Py_ssize_t>high_at[h + 1] if h < k else end
                    for i in range(<Py_ssize_t>high_at[h], stop):
                        offsets.data.as_ulonglongs[o] = top | self._low.data.as_uints[i]
                        o += 1
            resize(self._low, start)  # to the point: its memory goes as the pieces come
            pieces.append((group, offsets))
            end = start
            k = j - 1
        pieces.reverse()
        self._reset()
        return pieces

    # ---- internals (replay_records calls _find, _append and _pop_at) ----------------------
    cdef uint64_t _id_of(self, Py_ssize_t i) noexcept:
        cdef const unsigned long long *at = self._id_at.data.as_ulonglongs
        cdef Py_ssize_t r = _bisect_right(at, 0, self._nid, <uint64_t>i) - 1
        return self._id_first.data.as_ulonglongs[r] + <uint64_t>(i - <Py_ssize_t>at[r])

    cdef uint64_t _position_of(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t k = _bisect_right(
            self._high_at.data.as_ulonglongs, 0, self._nhigh, <uint64_t>i) - 1
        return (self._high.data.as_ulonglongs[k] << 32) | self._low.data.as_uints[i]

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _find(self, uint64_t id) except -2:
        """Index of the live entry of ``id``, or -1."""
        cdef const unsigned long long *id_at
        cdef const unsigned long long *id_first
        cdef Py_ssize_t cursor = self._cursor, k, start, end, lo, r, hi, i
        cdef object found
        if self._live == 0:
            return -1
        if self._index is not None:
            found = self._index.get(id)
            return -1 if found is None else <Py_ssize_t>found
        if self._id_of(cursor) == id:
            return cursor
        id_at = self._id_at.data.as_ulonglongs
        id_first = self._id_first.data.as_ulonglongs
        for k in range(self._nruns):
            start = self._runs[k]
            end = self._runs[k + 1] if k + 1 < self._nruns else self._n
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            r = _bisect_right(id_at, 0, self._nid, <uint64_t>lo) - 1
            if id < id_first[r] + <uint64_t>(lo - <Py_ssize_t>id_at[r]):
                continue  # below the run's first id
            # The id run that would hold it: the last one from r whose first id is <= id (the
            # runs of this stretch go up, ids strictly increasing within it).
            hi = _bisect_right(id_at, r, self._nid, <uint64_t>(end - 1))
            r = _bisect_right(id_first, r + 1, hi, id) - 1
            if id - id_first[r] >= <uint64_t>(end - <Py_ssize_t>id_at[r]):
                continue  # past the stretch's end (unsigned: no overflow for huge gaps)
            i = <Py_ssize_t>id_at[r] + <Py_ssize_t>(id - id_first[r])
            if (r + 1 == self._nid or i < <Py_ssize_t>id_at[r + 1]) and not _is_dead(
                self._dead.data.as_uchars, i
            ):
                return i
        return -1

    cdef int _append(self, uint64_t id, uint64_t position) except -1:
        """Add an entry for ``id``, which the caller knows is not queued."""
        cdef Py_ssize_t n = self._n
        cdef Py_ssize_t dead = n - self._live
        cdef uint64_t previous
        if dead >= REPLAY_COMPACT_MIN and dead > self._live:
            self._compact()
            n = self._n
        if n == 0:
            self._runs[0] = 0
            self._nruns = 1
            self._put(id, position, True, 0)
        else:
            # The last id run holds the last entry.
            previous = (self._id_first.data.as_ulonglongs[self._nid - 1]
                        + <uint64_t>(n - 1 - <Py_ssize_t>self._id_at.data.as_ulonglongs[self._nid - 1]))
            if self._index is None and id <= previous:
                self._new_run(n)
            self._put(id, position, False, previous)
        self._live += 1
        if self._index is not None:
            self._index[id] = n
        return 0

    cdef int _put(self, uint64_t id, uint64_t position, bint first, uint64_t previous) except -1:
        """Store entry ``_n`` (``previous``: the id of the entry before it, unless ``first``)."""
        cdef Py_ssize_t n = self._n
        cdef uint64_t high = position >> 32
        if first or previous == U64_MAX or id != previous + 1:
            _room(self._id_at, self._nid + 1)
            _room(self._id_first, self._nid + 1)
            self._id_at.data.as_ulonglongs[self._nid] = n
            self._id_first.data.as_ulonglongs[self._nid] = id
            self._nid += 1
        if n == 0 or high != self._high.data.as_ulonglongs[self._nhigh - 1]:
            _room(self._high_at, self._nhigh + 1)
            _room(self._high, self._nhigh + 1)
            self._high_at.data.as_ulonglongs[self._nhigh] = n
            self._high.data.as_ulonglongs[self._nhigh] = high
            self._nhigh += 1
        _room(self._low, n + 1)
        self._low.data.as_uints[n] = <unsigned int>position  # its low 32 bits
        if n & 7 == 0:
            _room(self._dead, (n >> 3) + 1)
            self._dead.data.as_uchars[n >> 3] = 0
        self._n = n + 1
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
            if not _is_dead(self._dead.data.as_uchars, i):
                index[self._id_of(i)] = i
        self._index = index
        self._nruns = 0
        return 0

    cdef int _pop_at(self, Py_ssize_t i, uint64_t id, uint64_t *position) except -1:
        cdef unsigned char *dead = self._dead.data.as_uchars
        position[0] = self._position_of(i)
        dead[i >> 3] |= <unsigned char>(1 << (i & 7))
        self._live -= 1
        if self._live == 0:
            self._reset()
            return 0
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while _is_dead(dead, i):  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _squeeze(self) except -1:
        """Move the live entries to the front, in order, dropping every tombstone."""
        cdef Py_ssize_t cursor = self._cursor, n = self._n, i, r, k, nid, nhigh
        cdef array low, dead, id_at, id_first, high_at, high
        cdef const unsigned char *marks
        cdef bint first = True
        cdef uint64_t previous = 0, id
        if n - cursor == self._live:  # no tombstone after the cursor: drop the prefix
            if cursor:
                memmove(self._low.data.as_uints, self._low.data.as_uints + cursor,
                        (n - cursor) * sizeof(unsigned int))
                self._n = n - cursor
                for i in range((self._n + 7) >> 3):
                    self._dead.data.as_uchars[i] = 0
                self._nid = _cut(self._id_at, self._id_first, self._nid, cursor, True)
                self._nhigh = _cut(self._high_at, self._high, self._nhigh, cursor, False)
            self._cursor = 0
            return 0
        # Tombstones among the live entries: rebuild from the live ones, in order.
        low, dead, id_at, id_first, high_at, high = (
            self._low, self._dead, self._id_at, self._id_first, self._high_at, self._high)
        nid, nhigh = self._nid, self._nhigh
        self._reset()
        marks = dead.data.as_uchars
        r = _bisect_right(id_at.data.as_ulonglongs, 0, nid, <uint64_t>cursor) - 1
        k = _bisect_right(high_at.data.as_ulonglongs, 0, nhigh, <uint64_t>cursor) - 1
        for i in range(cursor, n):
            while r + 1 < nid and <Py_ssize_t>id_at.data.as_ulonglongs[r + 1] <= i:
                r += 1
            while k + 1 < nhigh and <Py_ssize_t>high_at.data.as_ulonglongs[k + 1] <= i:
                k += 1
            if _is_dead(marks, i):
                continue
            id = id_first.data.as_ulonglongs[r] + <uint64_t>(i - <Py_ssize_t>id_at.data.as_ulonglongs[r])
            self._put(id, (high.data.as_ulonglongs[k] << 32) | low.data.as_uints[i], first, previous)
            first = False
            previous = id
        self._live = self._n
        return 0

    cdef int _compact(self) except -1:
        cdef const unsigned long long *id_at
        cdef const unsigned long long *id_first
        cdef Py_ssize_t r
        self._squeeze()
        # Ids go up by one within an id run, so a run of strictly increasing ids can only
        # start where an id run does: where its first id is not above the last one before.
        id_at = self._id_at.data.as_ulonglongs
        id_first = self._id_first.data.as_ulonglongs
        self._runs[0] = 0
        self._nruns = 1
        self._index = None
        for r in range(1, self._nid):
            if id_first[r] <= id_first[r - 1] + (id_at[r] - id_at[r - 1] - 1):
                if self._nruns == REPLAY_RUN_LIMIT:
                    self._build_index()
                    return 0
                self._runs[self._nruns] = <Py_ssize_t>id_at[r]
                self._nruns += 1
        return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _cut(array starts, array values, Py_ssize_t count, Py_ssize_t cursor,
                     bint counting) except -1:
    """Keep the runs ``starts``/``values`` (entry where each starts, and its value) of the
    entries from ``cursor`` on, renumbered from 0; ``counting``: a run's value goes up by one
    an entry (an id run), so the run that ``cursor`` falls in starts at its value there.
    Returns how many are kept."""
    cdef unsigned long long *at = starts.data.as_ulonglongs
    cdef unsigned long long *v = values.data.as_ulonglongs
    cdef Py_ssize_t r = _bisect_right(at, 0, count, <uint64_t>cursor) - 1, j
    if counting:
        v[r] += <uint64_t>(cursor - <Py_ssize_t>at[r])
    at[r] = cursor
    for j in range(r, count):
        at[j - r] = at[j] - <uint64_t>cursor
        v[j - r] = v[j]
    return count - r


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
