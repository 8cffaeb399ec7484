# cython: language_level=3
"""The reply side of the wire: a connection's reply writer, one ``write()`` on the socket, and
the numbers of a VALUE line (twin: erq/_wire_py.py; selector: erq.wire).

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

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport memcpy
from posix.unistd cimport write as c_write

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLHUP
        POLLERR
        POLLNVAL
        POLLRDHUP


cdef extern from "<errno.h>":
    int EWOULDBLOCK


# Raw-pointer forms, for a list slot whose reference is handled by hand (append_end).
cdef extern from "Python.h":
    PyObject *_list_item "PyList_GET_ITEM"(object, Py_ssize_t)
    void _list_set "PyList_SET_ITEM"(object, Py_ssize_t, PyObject *)
    Py_ssize_t _refcount "Py_REFCNT"(PyObject *)
    bint _is_bytes "PyBytes_CheckExact"(PyObject *)
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject *)
    int _PyBytes_Resize(PyObject **, Py_ssize_t)
    # A list's slot array, for clear_replies: its layout is CPython's public (non-limited) API.
    ctypedef struct PyListObject:
        PyObject **ob_item
        Py_ssize_t allocated
    void _set_size "Py_SET_SIZE"(object, Py_ssize_t)
    void Py_XDECREF(PyObject *)
    void PyMem_Free(void *)


cdef bytes _END = b"END\r\n"
cdef bytes _CRLF = b"\r\n"
cdef bytes _CRLF_END = b"\r\nEND\r\n"


# A value up to this size is copied into its VALUE block (see append_value).
VALUE_COPY_LIMIT = 4096
cdef Py_ssize_t _copy_limit = VALUE_COPY_LIMIT

cdef extern from "lend.h":
    void erq_lend_bytes(object bytes, Py_ssize_t size)

# The VALUE block every get's reply is made in, lent while only this module holds it (the
# reply was sent and dropped: the next get's is made in it again). Each block its own
# bytes object cost an allocation and a free of the block's size, ~200 instructions for a
# 10-byte value and ~600 for a 1 KiB one (past glibc's per-thread cache). A block that does
# not fit, or one made while the last is still held (the next of a pipeline's replies, a reply
# the socket did not take at once), is a bytes object of its own, as before.
cdef enum:
    SPARE_SIZE = 4096 + 512  # VALUE_COPY_LIMIT's value, its line and the reply's END
cdef bytes _spare = PyBytes_FromStringAndSize(NULL, SPARE_SIZE)


cdef class ReplyWriter:
    """What a compiled Session hands its replies to with a C call: erq's epoll connection and
    the SocketWriter in front of a loop's transport. Through the bound ``write`` method it
    was a Python call, ~90 instructions of each reply.

    ``lone`` is True while erq's epoll layer hands the connection a read that no other
    connection's was ready beside: its long pipeline's replies are then sent as they are made
    (commands.SEND_EVERY), since nothing else would keep the loop busy meanwhile."""

    cpdef write(self, object data):
        raise NotImplementedError


cdef class SocketWriter(ReplyWriter):
    """Write replies for one connection; ``write`` is handed to its Session."""

    def __cinit__(self, transport):
        self._transport = transport
        self._transport_write = transport.write
        self._is_closing = transport.is_closing
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._backlog = False

    cpdef write(self, object data):
        cdef Py_ssize_t size
        cdef Py_ssize_t n
        if type(data) is not bytes:
            data = bytes(memoryview(data))  # a bytes-like object; an int is a TypeError
        size = PyBytes_GET_SIZE(data)
        if self._fd < 0 or self._is_closing():
            self._transport_write(data)
            return
        if self._backlog:
            if self._transport.get_write_buffer_size():
                self._transport_write(data)
                return
            self._backlog = False
        n = c_write(self._fd, PyBytes_AS_STRING(data), size)
        if n == size:
            return
        if n < 0:
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                self._transport_write(data)  # the transport meets the error and reports it
                return
            n = 0
        self._backlog = True
        self._transport_write(data[n:])


cdef inline char *_digits(char *end, unsigned long long value) noexcept:
    """Write ``value`` in decimal so that it ends just before ``end``; return its start."""
    while True:
        end -= 1
        end[0] = <char>(48 + value % 10)
        value //= 10
        if value == 0:
            return end


cpdef bint peer_gone(int fd) noexcept:
    """Whether the client of socket ``fd`` is gone as far as the kernel knows: it reset the
    connection or shut its side (POLLRDHUP), or the descriptor is closed. A blocked get is
    not handed an item then (PROTOCOL §5: none is lost to a dead client); it may have arrived
    in the same batch of events as the item, before the loop hears of it."""
    cdef pollfd p
    p.fd = fd
    p.events = POLLRDHUP
    p.revents = 0
    if poll(&p, 1, 0) <= 0:
        return False
    return (p.revents & (POLLHUP | POLLERR | POLLNVAL | POLLRDHUP)) != 0


cpdef bytes value_header(bytes prefix, unsigned int flags, Py_ssize_t size, long long cas=-1):
    """``prefix`` (``b"VALUE <key> "``) then ``<flags> <size>[ <cas>]\\r\\n``, as one bytes.

    Formatted through Python this took two int-to-str conversions, a join and an encode (~700
    instructions a get); here it is digits written backwards into a stack buffer."""
    return _block(prefix, flags, size, cas, NULL, False)


cpdef append_value(list out, bytes prefix, unsigned int flags, object data, long long cas=-1,
                   bint end=False):
    """Append a VALUE block for ``data`` to ``out``, a reply's pieces, joined when it is sent;
    with ``end`` (the last key of a get), the reply's END after it.

    A value up to VALUE_COPY_LIMIT bytes goes in one piece with its line and CRLF (and END),
    so a one-key get's reply is one piece, sent as it is; a larger one is appended as it is,
    after its line, so that its bytes are copied only by the join."""
    cdef Py_ssize_t size = len(data)
    if out is None:  # a typed argument lets None through
        raise TypeError("append_value takes a list, not None")
    if size <= _copy_limit and type(data) is bytes:
        out.append(_block(prefix, flags, size, cas, <const char *><bytes>data, end))
    else:
        out.append(_block(prefix, flags, size, cas, NULL, False))
        out.append(data)
        out.append(_CRLF_END if end else _CRLF)


cpdef append_end(list out):
    """Append ``END`` and its CRLF to a reply's pieces: into the last piece when it is a bytes
    only the list holds (the VALUE block just made for a get of one key), so that the reply is
    one piece, which the join at flush hands on as it is instead of copying it again."""
    cdef Py_ssize_t n
    cdef PyObject *last
    cdef Py_ssize_t size
    if out is None:  # a typed argument lets None through; its size would be read from None
        raise TypeError("append_end takes a list, not None")
    n = PyList_GET_SIZE(out)
    if n:
        last = _list_item(out, n - 1)  # borrowed: the list's reference
        if last == <PyObject *>_spare and _refcount(last) == 2:  # the list's and the module's
            size = _bytes_size(last)
            if size + 5 <= SPARE_SIZE:
                erq_lend_bytes(_spare, size + 5)
                memcpy(_bytes_data(last) + size, <const char *>_END, 5)
                return
        elif _refcount(last) == 1 and _is_bytes(last):
            size = _bytes_size(last)
            # The list's reference is the only one, so the object may be resized (and moved):
            # the slot takes the new address, with the same one reference.
            if _PyBytes_Resize(&last, size + 5) < 0:
                Py_INCREF(_END)  # the old object is gone: the slot must hold something
                _list_set(out, n - 1, <PyObject *>_END)
                raise MemoryError()
            memcpy(_bytes_data(last) + size, <const char *>_END, 5)
            _list_set(out, n - 1, last)
            return
    out.append(_END)


# An emptied reply list keeps its slot array up to this many slots (see clear_replies).
cdef Py_ssize_t _SLOTS_KEPT = 16


cpdef clear_replies(list out):
    """Empty a session's reply list after a flush, keeping its slot array for the next
    replies. ``list.clear`` gives the array back, and the next reply's append allocated it
    again: ~100 instructions of every request. A list grown past 16 slots (a long
    pipeline's replies) gives it back, so an idle connection holds a few slots at most. As in
    ``list.clear``, the list is empty before its items are released, and an append made
    while they are (by a finaliser) keeps the list's new array. The protocol empties the
    parser's request list the same way once its requests ran."""
    cdef PyListObject *lst
    cdef PyObject **items
    cdef Py_ssize_t n, allocated, i
    if out is None:  # a typed argument lets None through
        raise TypeError("clear_replies takes a list, not None")
    lst = <PyListObject *>out
    items = lst.ob_item
    n = PyList_GET_SIZE(out)
    allocated = lst.allocated
    if allocated > _SLOTS_KEPT or items == NULL:
        del out[:]
        return
    lst.ob_item = NULL
    lst.allocated = 0
    _set_size(out, 0)
    i = n
    while i > 0:
        i -= 1
        Py_XDECREF(items[i])
    if lst.ob_item == NULL:
        lst.ob_item = items
        lst.allocated = allocated
    else:
        PyMem_Free(items)


cdef bytes _block(bytes prefix, unsigned int flags, Py_ssize_t size, long long cas,
                  const char *data, bint with_end):
    """The VALUE line, then (when ``data`` is not NULL) its ``size`` bytes and CRLF, and with
    ``with_end`` the reply's END."""
    cdef char buf[64]  # three numbers of at most 20 digits, two spaces, CRLF
    cdef char *end = buf + 64
    cdef char *start = end - 2
    cdef Py_ssize_t plen = len(prefix)
    cdef Py_ssize_t nlen
    cdef Py_ssize_t total
    start[0] = 13
    start[1] = 10
    if cas >= 0:
        start = _digits(start, <unsigned long long>cas)
        start -= 1
        start[0] = 32
    start = _digits(start, <unsigned long long>size)
    start -= 1
    start[0] = 32
    start = _digits(start, flags)
    nlen = end - start
    total = plen + nlen + (size + 2 + (5 if with_end else 0) if data != NULL else 0)
    if total <= SPARE_SIZE and _refcount(<PyObject *>_spare) == 1:
        erq_lend_bytes(_spare, total)
        result = _spare
    else:
        result = PyBytes_FromStringAndSize(NULL, total)
    cdef char *out = PyBytes_AS_STRING(result)
    memcpy(out, <const char *>prefix, plen)
    memcpy(out + plen, start, nlen)
    if data != NULL:
        out += plen + nlen
        memcpy(out, data, size)
        out[size] = 13
        out[size + 1] = 10
        if with_end:
            memcpy(out + size + 2, <const char *>_END, 5)
    return result
