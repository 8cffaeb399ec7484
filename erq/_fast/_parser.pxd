# cython: language_level=3
# C declarations of erq/_fast/_parser.pyx: the compiled protocol cimports them, so its
# per-read feed() is a C call. Final: nothing subclasses the parser, so its methods are
# called directly, not through a vtable or a check for a Python override.
cimport cython


@cython.final
cdef class DataBudget:
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t held
    cdef public unsigned long long refused

    cdef bint _take(self, Py_ssize_t size, Py_ssize_t holding) noexcept


@cython.final
@cython.no_gc_clear
cdef class Parser:

    cdef Py_ssize_t _max_line
    cdef unsigned long long _max_item
    cdef char* _buf
    cdef Py_ssize_t _buflen
    cdef Py_ssize_t _bufcap
    cdef int _state
    cdef bint _closed
    # The storage request whose data block is being read (ST_DATA, ST_TRAILER, ST_SKIP).
    cdef int _p_kind                 # K_SET or K_UNSUPPORTED
    cdef object _p_word
    cdef object _p_name
    cdef object _p_flags
    cdef object _p_exptime
    cdef bint _p_noreply
    cdef unsigned long long _p_count  # declared byte count (may exceed max_item_size)
    cdef bytes _p_block               # the data block, filled in place in ST_DATA
    cdef Py_ssize_t _p_filled
    cdef Py_ssize_t _p_size           # the block's final size (_p_block may be shorter yet)
    cdef unsigned long long _skip_left
    cdef bint _no_room                # the block skipped is a set refused for want of room
    cdef DataBudget _budget           # None: no limit
    cdef Py_ssize_t _held             # what the block being read holds in the budget
    # The last set name and the last argument token made, handed out again while they repeat.
    cdef bytes _last_name
    cdef bytes _last_token
    cdef tuple _last_keys  # the keys of the last one-key get line: (_last_token,)
    cdef tuple _last_get  # and its request tuple (a get, not gets)

    cdef readonly Py_ssize_t stopped_at  # where the last feed stopped (see feed)
    cdef readonly Py_ssize_t extra_keys  # the last feed's get keys beyond each get's first
    cdef list _out  # feed's list: handed out again once its caller emptied it and let go

    cpdef list feed(self, object data, Py_ssize_t start=*, Py_ssize_t limit=*)
    cdef int _append(self, const char* p, Py_ssize_t n) except -1
    cdef int _close(self, list out, tuple reply) except -1
    cdef void _release(self)
    cdef void _give_back(self)
    cdef list _tokens(self, const char* s, Py_ssize_t i, Py_ssize_t n)
    cdef tuple _keys(self, const char* s, Py_ssize_t i, Py_ssize_t n)
    cdef bytes _token(self, const char* s, Py_ssize_t n)
    cdef int _emit(self, list out, object data) except -1
    cdef int _grow_block(self, Py_ssize_t room) except -1
    cdef Py_ssize_t _run(self, const char* p, Py_ssize_t n, list out, Py_ssize_t limit) except -1
    cdef int _line(self, const char* s, Py_ssize_t n, list out) except -1
