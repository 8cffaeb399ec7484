# cython: language_level=3
# The C types of erq/_fast/_append.pyx; the compiled queue cimports AppendCore for C calls.
from libc.stdint cimport uint32_t, uint64_t


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


cdef class Ticket:
    # fsync = always: the durability of one journal's appends in one batch (the compiled
    # session reads these in C).
    cdef public bint done
    cdef public object error
    cdef public list waiters

    cpdef add_waiter(self, object callback)
    cpdef resolve(self, object error)
    cpdef notify(self)


cdef class AppendCore:
    # The current segment's writer: any object with SegmentWriter's API (a SegmentWriter of
    # this module is called in C, another through Python). Assigned by the subclass.
    cdef public object _writer
    # An append needs no fsync bookkeeping (no call to the subclass's _written()).
    cdef public bint _quiet
    # fsync = always: the commit ticket of the batch that has not started yet, which every
    # append joins until it starts (GroupCommit sets and clears it); None otherwise.
    cdef public Ticket _ticket

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
