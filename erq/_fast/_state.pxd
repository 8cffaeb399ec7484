# C types for the compiled build of erq/_state_py.py (linked here as _state.py; see its
# docstring). Counters become C integers and the fields read on every request struct fields,
# for the compiled session and commands, which cimport this module.
cimport cython

cimport erq._fast._queues as c_queues


cdef class Counters:
    cdef public unsigned long long cmd_get
    cdef public unsigned long long cmd_set
    cdef public unsigned long long cmd_peek
    cdef public unsigned long long get_hits
    cdef public unsigned long long get_misses
    cdef public unsigned long long bytes_read
    cdef public unsigned long long bytes_written
    cdef public long long curr_connections
    cdef public unsigned long long total_connections
    cdef public unsigned long long rejected_connections


cdef class Deadlines:
    cdef public object loop
    cdef dict _buckets
    cdef list _heap
    cdef long long _armed
    cdef object _timer

    @cython.locals(now=cython.double, deadline=cython.longlong, key=object, bucket=object)
    cpdef long long add(self, object entry, double delay) except -1
    @cython.locals(key=object, bucket=object)
    cpdef discard(self, object entry, long long deadline)
    cdef _arm(self, long long deadline)


cdef class ServerState:
    cdef object _config
    cdef public bint kestrel
    cdef public c_queues.QueueCollection queues
    cdef public object loop
    cdef public Counters counters
    cdef public Deadlines deadlines
    cdef public object data_budget
    cdef public double started
    cdef public set connections
    cdef public bint ready
    cdef public bint stopping
    cdef public object shutdown_requested
    cdef public object reload_requested
    cdef public object open_file_limit
    cdef object _status_file
    cdef str _status
    cdef readonly bint up
    cdef readonly bint quiescent
