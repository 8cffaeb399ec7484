# cython: language_level=3
# The compiled reply side of the wire (erq/_fast/_wire.pyx): the commands module cimports it so
# that a VALUE line is formatted by a C call.

cdef class ReplyWriter:
    cdef public bint lone  # the only connection the loop found ready (SEND_EVERY)
    cpdef write(self, object data)


cdef class SocketWriter(ReplyWriter):
    cdef int _fd
    cdef object _transport
    cdef object _transport_write
    cdef object _is_closing
    cdef bint _backlog  # the transport holds bytes not yet sent: the next writes go after them

    cpdef write(self, object data)


cpdef bint peer_gone(int fd) noexcept
cpdef bytes value_header(bytes prefix, unsigned int flags, Py_ssize_t size, long long cas=*)
cpdef append_value(
    list out, bytes prefix, unsigned int flags, object data, long long cas=*, bint end=*
)
cpdef append_end(list out)
cpdef clear_replies(list out)
