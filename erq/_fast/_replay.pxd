# cython: language_level=3
# The C types of erq/_fast/_replay.pyx.
from cpython.array cimport array
from libc.stdint cimport uint64_t


cdef enum:
    REPLAY_RUN_LIMIT = 32  # ReplayTail.RUN_LIMIT: runs searched by bisection before an index


cdef class ReplayTail:
    # Entries [0, _n) of two 'Q' arrays: ids in ADD order and the positions of their ADD
    # records, TOMBSTONE once removed (the arrays' lengths follow _n). _cursor is the first
    # live entry (_n when there is none), _live the live entries.
    cdef array _ids
    cdef array _positions
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cursor
    cdef Py_ssize_t _live
    # Starts of the runs of strictly increasing ids (the first one <= _cursor), unless
    # _index (id -> index of every live entry) is not None: then _nruns is 0.
    cdef Py_ssize_t _runs[REPLAY_RUN_LIMIT]
    cdef Py_ssize_t _nruns
    cdef dict _index

    cdef int _reset(self) except -1
    cdef Py_ssize_t _find(self, uint64_t id) except -2
    cdef int _append(self, uint64_t id, uint64_t position) except -1
    cdef int _new_run(self, Py_ssize_t start) except -1
    cdef int _build_index(self) except -1
    cdef int _pop_at(self, Py_ssize_t i, uint64_t id, uint64_t *position) except -1
    cdef int _squeeze(self) except -1
    cdef int _compact(self) except -1
