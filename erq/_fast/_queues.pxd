# C types for the compiled build of erq/_queues_py.py (linked here as _queues.py; see its
# docstring). The Python source is the behaviour; this file makes the collection a struct and
# its per-request method a C function.
cimport cython

cimport erq._fast._clock as _clock
cimport erq._fast._queue as c_queue


cdef class QueueCollection:
    cdef public object config
    cdef public object data_dir
    cdef object _journal_factory
    cdef object _clock
    cdef object _background
    cdef dict _queues
    cdef public c_queue.ItemMemory memory
    cdef public dict by_raw_name
    cdef dict _children
    cdef public long long total_items
    cdef tuple _ticketed
    cdef public long long queue_creates
    cdef public long long queue_deletes
    cdef public object open_file_limit
    cdef public long long slow_ops
    cdef public long long queue_expires
    cdef public long long recovered_items
    cdef public long long recovered_bytes
    cdef public list warnings
    cdef object _dropped
    cdef object _journal_kept
    cdef object _copy_failed

    cpdef object get_or_create(self, object name)
    @cython.locals(
        queue=c_queue.Queue, child=c_queue.Queue, kids=tuple, found=dict, now=cython.longlong
    )
    cpdef tuple add(self, object name, object data, object flags, long long expiry, object queue=*)
