# cython: language_level=3
from cpython.array cimport array
from libc.stdint cimport uint32_t, uint64_t


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


cdef class SegmentWriter:
    # A writable buffer export of the segment's mmap, held until release().
    cdef Py_buffer _view
    cdef bint _held
    cdef Py_ssize_t _pos
    # The file the buffer maps, where large ADD records are pwritev()'d (never closed here); -1.
    cdef int _fd
    # ADD records and their bytes, the greatest ADD id, then records per opcode 2..6.
    cdef uint64_t _adds
    cdef uint64_t _add_bytes
    cdef uint64_t _max_id
    cdef uint64_t _ops[7]
    # trim: the buffer is a shared file mapping whose pages behind _pos may be dropped from
    # the process (they stay in the page cache); _trimmed: pages below it were dropped.
    cdef bint _trim
    cdef Py_ssize_t _trimmed

    cdef void _drop_behind(self) noexcept

    cpdef long long append_add(self, uint64_t id, uint32_t flags, uint64_t add_time,
                               uint64_t expiry, object data) except -2
    cpdef long long append_op(self, int opcode, uint64_t id=*) except -2
    cpdef release(self)


cdef class RecordIterator:
    # A read-only buffer export, released as soon as iteration stops.
    cdef Py_buffer _view
    cdef bint _held
    cdef bint _data
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _end
    cdef readonly int status

    cpdef release(self)


cdef class AppendCore:
    # The current segment's writer: any object with SegmentWriter's API (a SegmentWriter of
    # this module is called in C, another through Python). Assigned by the subclass.
    cdef public object _writer
    # An append needs no fsync bookkeeping (no call to the subclass's _written()).
    cdef public bint _quiet
    # fsync = always: the commit ticket of the batch that has not started yet, which every
    # append joins until it starts (GroupCommit sets and clears it); None otherwise.
    cdef public object _ticket

    # Segments sealed because they were full or for a compaction (the queue compares it after
    # each add: a struct field, not an instance-dict lookup). Counted by the subclass.
    cdef public long long rotations

    # The queue's per-request appends: C calls from the compiled queue (never overridden).
    cpdef object add(self, uint64_t id, uint32_t flags, uint64_t add_time, uint64_t expiry,
                     object data, bint in_memory=*)
    cpdef object remove(self, uint64_t id)
    cpdef object open(self, uint64_t id)
    cpdef object confirm(self, uint64_t id)
    cpdef object unremove(self, uint64_t id)
    cdef object _op(self, int opcode, uint64_t id)
