# cython: language_level=3
"""A connection's reply writer: one ``write()`` on the socket (twin: erq/_wire_py.py;
selector: erq.wire).

Every reply used to go through the transport's ``write``, which under uvloop costs ~1,000
instructions for what is, on an idle socket, the same single system call: a buffer list, a
Py_buffer, a write context, then ``uv_try_write``. Here the reply goes to the socket's
descriptor directly while the transport has nothing queued; the transport takes over, as
before, for whatever the socket does not accept at once (its buffer, high-water mark and
pause_writing keep working), for every write until it has sent all it holds, and once it is
closing (its descriptor may then be closed, and its number reused by another connection).
An error other than "would block" is left to the transport too: it meets it again and
closes the connection the way it always did.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from posix.unistd cimport write as c_write


cdef extern from "<errno.h>":
    int EWOULDBLOCK


cdef class SocketWriter:
    """Write replies for one connection; ``write`` is handed to its Session."""

    cdef int _fd
    cdef object _transport
    cdef object _transport_write
    cdef object _is_closing
    cdef bint _backlog  # the transport holds bytes not yet sent: the next writes go after them

    def __cinit__(self, transport):
        self._transport = transport
        self._transport_write = transport.write
        self._is_closing = transport.is_closing
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._backlog = False

    cpdef write(self, bytes data):
        cdef Py_ssize_t size = len(data)
        cdef Py_ssize_t n
        if self._fd < 0 or self._is_closing():
            self._transport_write(data)
            return
        if self._backlog:
            if self._transport.get_write_buffer_size():
                self._transport_write(data)
                return
            self._backlog = False
        n = c_write(self._fd, <const char*>data, size)
        if n == size:
            return
        if n < 0:
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                self._transport_write(data)  # the transport meets the error and reports it
                return
            n = 0
        self._backlog = True
        self._transport_write(data[n:])
