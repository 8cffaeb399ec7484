# cython: language_level=3
# The C types of erq/_fast/_replay.pyx.
from cpython.array cimport array
from libc.stdint cimport uint64_t


cdef enum:
    REPLAY_RUN_LIMIT = 32  # ReplayTail.RUN_LIMIT: runs searched by bisection before an index


cdef class ReplayTail:
    # Entries [0, _n): _low ('I') holds the low 32 bits of each one's position and _dead ('B')
    # a bit per entry, set once it is removed. Ids are runs that go up by one an entry (_nid
    # of them): _id_at ('Q') the first entry of each, _id_first ('Q') its id. The high bits of
    # the positions (_nhigh stretches): _high_at ('Q') the first entry of each stretch that
    # shares them, _high ('Q') those bits. Each array's length is its room, grown by an eighth
    # (_room); the counts say what is used. _cursor is the first live entry (_n when there is
    # none), _live the live entries.
    cdef array _low
    cdef array _dead
    cdef array _id_at
    cdef array _id_first
    cdef array _high_at
    cdef array _high
    cdef Py_ssize_t _n
    cdef Py_ssize_t _nid
    cdef Py_ssize_t _nhigh
    cdef Py_ssize_t _cursor
    cdef Py_ssize_t _live
    # Starts of the runs of strictly increasing ids (the first one <= _cursor), unless
    # _index (id -> index of every live entry) is not None: then _nruns is 0.
    cdef Py_ssize_t _runs[REPLAY_RUN_LIMIT]
    cdef Py_ssize_t _nruns
    cdef dict _index

    cdef int _reset(self) except -1
    cdef uint64_t _id_of(self, Py_ssize_t i) noexcept
    cdef uint64_t _position_of(self, Py_ssize_t i) noexcept
    cdef Py_ssize_t _find(self, uint64_t id) except -2
    cdef int _append(self, uint64_t id, uint64_t position) except -1
    cdef int _put(self, uint64_t id, uint64_t position, bint first, uint64_t previous) except -1
    cdef int _new_run(self, Py_ssize_t start) except -1
    cdef int _build_index(self) except -1
    cdef int _pop_at(self, Py_ssize_t i, uint64_t id, uint64_t *position) except -1
    cdef int _squeeze(self) except -1
    cdef int _compact(self) except -1
