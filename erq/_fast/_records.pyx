# cython: language_level=3
"""Journal records: CRC32C, encoding and checking, reading back. The C twin of
erq/journal/_records_py.py (same names, same behaviour; the pure-Python module is the
reference). Layout: erq/journal/format.py.

CRC32C runs in C (SSE4.2 when the CPU has it) and the readers walk raw pointers. The C-level
primitives (``_check``, ``_fill_add``, ...; declared in ``_records.pxd``) are what the replay
(``_replay.pyx``) and the appender (``_append.pyx``) build on: the CRC's tables and CPU dispatch
live in this module only.
"""

import errno as _errno
import os

from ..journal_api import JournalError

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.uio cimport iovec, pwritev


cdef extern from *:
    """
    /* A new tuple of n empty slots, of type t (tuple or a plain tuple subclass). */
    static PyObject *erq_alloc_tuple(PyTypeObject *t, Py_ssize_t n) {
        return t->tp_alloc(t, n);
    }
    /* Instances laid out exactly like a tuple (no __dict__, no extra slots). */
    static int erq_plain_tuple_type(PyTypeObject *t) {
        return PyType_IsSubtype(t, &PyTuple_Type)
            && t->tp_basicsize == PyTuple_Type.tp_basicsize
            && t->tp_itemsize == PyTuple_Type.tp_itemsize
            && t->tp_dictoffset == 0;
    }
    """
    object erq_alloc_tuple(type t, Py_ssize_t n)
    bint erq_plain_tuple_type(type t)


erq_crc32c_init()
CRC32C_IMPLEMENTATION = "sse4.2" if erq_crc32c_uses_hw else "slicing-by-8"


# ---- primitives (no Python objects) ------------------------------------------------------

cdef int _check(const unsigned char *buf, Py_ssize_t p, Py_ssize_t end,
                Py_ssize_t *nxt) noexcept nogil:
    """Status of the record at p; *nxt is the offset after it when it fits, else p."""
    cdef Py_ssize_t left = end - p
    cdef Py_ssize_t i
    cdef uint32_t length
    cdef unsigned char op
    cdef bint shaped
    nxt[0] = p
    if left < 4:
        for i in range(left):
            if buf[p + i]:
                return REC_TORN
        return REC_END
    length = erq_load32(buf + p)
    if length == 0:
        return REC_END
    if left < 8 or <uint64_t>length > <uint64_t>(left - 8):
        return REC_TORN
    nxt[0] = p + 8 + length
    op = buf[p + 8]
    if op == OP_ADD:
        shaped = length >= ADD_FIXED_LENGTH
    elif OP_REMOVE <= op <= OP_UNREMOVE:
        shaped = length == 9
    else:
        shaped = op == OP_FLUSH and length == 1
    if not shaped:
        return REC_BAD
    if erq_crc32c(0, buf + p + 8, length) != erq_load32(buf + p + 4):
        return REC_BAD
    # An id or time past 2**63 - 1 (the top byte of a little-endian field): erq writes none,
    # and the queue holds them as signed 64-bit integers (a foreign file).
    if op != OP_FLUSH and (buf[p + 16] & 0x80 or (
            op == OP_ADD and (buf[p + 28] | buf[p + 36]) & 0x80)):
        return REC_BAD
    return REC_VALID


cdef Py_ssize_t _first_nonzero(const unsigned char *buf, Py_ssize_t p,
                               Py_ssize_t end) noexcept nogil:
    cdef uint64_t word
    while p < end and (<size_t>(buf + p) & 7):
        if buf[p]:
            return p
        p += 1
    while end - p >= 8:
        memcpy(&word, buf + p, 8)
        if word:
            break
        p += 8
    while p < end:
        if buf[p]:
            return p
        p += 1
    return -1


cdef bint _accept(const unsigned char *buf, Py_ssize_t q, Py_ssize_t end) noexcept nogil:
    """A resync point: a valid record followed by another or by a clean end."""
    cdef Py_ssize_t nxt, ignored
    cdef int status
    if _check(buf, q, end, &nxt) != REC_VALID:
        return False
    status = _check(buf, nxt, end, &ignored)
    return status == REC_VALID or (status == REC_END and _first_nonzero(buf, nxt, end) < 0)


cdef Py_ssize_t _resync(const unsigned char *buf, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """The first q > start where _accept holds, or -1."""
    cdef Py_ssize_t q = start + 1
    cdef Py_ssize_t nz
    cdef unsigned char op
    while q + 9 <= end:
        if erq_load32(buf + q) == 0:
            # No record starts where its length would be 0: skip the zero run.
            nz = _first_nonzero(buf, q, end)
            if nz < 0:
                return -1
            q = nz - 3 if nz - 3 > q + 1 else q + 1
            continue
        op = buf[q + 8]
        if OP_ADD <= op <= OP_FLUSH and _accept(buf, q, end):
            return q
        q += 1
    return -1


cdef Py_ssize_t _bounds(Py_ssize_t size, Py_ssize_t start, Py_ssize_t end) except -1:
    if end < 0:
        end = size
    if end > size or start < 0 or start > end:
        raise ValueError(f"bad range [{start}, {end}) for a buffer of {size} bytes")
    return end


cdef tuple _decode(const unsigned char *buf, Py_ssize_t p, Py_ssize_t nxt, bint want_data):
    cdef int op = buf[p + 8]
    cdef object data = None
    if op == OP_ADD:
        if want_data:
            data = PyBytes_FromStringAndSize(<const char *>buf + p + ADD_OVERHEAD,
                                             nxt - p - ADD_OVERHEAD)
        return (p, op, erq_load64(buf + p + 9), erq_load32(buf + p + 17),
                erq_load64(buf + p + 21), erq_load64(buf + p + 29), data)
    if op == OP_FLUSH:
        return (p, op, 0, 0, 0, 0, None)
    return (p, op, erq_load64(buf + p + 9), 0, 0, 0, None)


cdef void _fill_add(unsigned char *p, uint64_t id, uint32_t flags, uint64_t add_time,
                    uint64_t expiry, const unsigned char *data, Py_ssize_t n) noexcept nogil:
    """Encode an ADD record at p; the length goes in last (a half-written record reads as END)."""
    p[8] = OP_ADD
    erq_store64(p + 9, id)
    erq_store32(p + 17, flags)
    erq_store64(p + 21, add_time)
    erq_store64(p + 29, expiry)
    memcpy(p + ADD_OVERHEAD, data, n)
    erq_store32(p + 4, erq_crc32c(0, p + 8, ADD_FIXED_LENGTH + n))
    erq_store32(p, <uint32_t>(ADD_FIXED_LENGTH + n))


cdef Py_ssize_t _pwrite_add(int fd, unsigned char *p, Py_ssize_t at, uint64_t id,
                            uint32_t flags, uint64_t add_time, uint64_t expiry,
                            const unsigned char *data, Py_ssize_t n, int *err) noexcept nogil:
    """Write an ADD record at offset ``at`` of ``fd``, which ``p`` (the record's place in the
    mapping) maps: one pwritev() of the header and the data, no page of the mapping touched.

    Returns the bytes written: ADD_OVERHEAD + n when the record is whole. On a failure
    (*err = errno, or 0 for a short write) the bytes that did land are zeroed again through
    the mapping, so the segment is as it was.
    """
    cdef unsigned char head[ADD_OVERHEAD]
    cdef iovec iov[2]
    cdef Py_ssize_t got
    head[8] = OP_ADD
    erq_store64(head + 9, id)
    erq_store32(head + 17, flags)
    erq_store64(head + 21, add_time)
    erq_store64(head + 29, expiry)
    erq_store32(head + 4, erq_crc32c(erq_crc32c(0, head + 8, ADD_FIXED_LENGTH), data, n))
    erq_store32(head, <uint32_t>(ADD_FIXED_LENGTH + n))
    iov[0].iov_base = head
    iov[0].iov_len = ADD_OVERHEAD
    iov[1].iov_base = <void *>data
    iov[1].iov_len = <size_t>n
    while True:
        got = pwritev(fd, iov, 2, at)
        if got >= 0 or errno != EINTR:
            break
    if got < 0:
        err[0] = errno
        return 0
    if got < ADD_OVERHEAD + n:
        err[0] = 0
        memset(p, 0, got)
    return got


cdef int _write_failed(int err, Py_ssize_t got, Py_ssize_t want, Py_ssize_t at) except -1:
    """Raise what the journal reports for a record pwritev() could not write."""
    cdef object cause = None
    if err:
        cause = OSError(err, os.strerror(err))
        why = "disk full" if err in (_errno.ENOSPC, _errno.EDQUOT) else os.strerror(err)
    else:
        why = f"short write ({got} of {want} bytes)"
    raise JournalError(f"cannot write the record at offset {at} of a segment: {why}") from cause


cdef void _fill_op(unsigned char *p, int opcode, uint64_t id) noexcept nogil:
    cdef uint32_t length = 1
    p[8] = <unsigned char>opcode
    if opcode != OP_FLUSH:
        erq_store64(p + 9, id)
        length = 9
    erq_store32(p + 4, erq_crc32c(0, p + 8, length))
    erq_store32(p, length)


# ---- public API ----------------------------------------------------------------------------

def crc32c(data, uint32_t crc=0):
    """CRC32C of ``data``, continuing from ``crc`` (the result for the bytes before it)."""
    cdef Py_buffer view
    cdef uint32_t out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len > NOGIL_THRESHOLD:
            with nogil:
                out = erq_crc32c(crc, <const unsigned char *>view.buf, view.len)
        else:
            out = erq_crc32c(crc, <const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def _crc32c_portable(data, uint32_t crc=0):
    """The slicing-by-8 path whatever the CPU (so tests can compare it with SSE4.2)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return erq_crc32c_portable(crc, <const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def encode_add(uint64_t id, uint32_t flags, uint64_t add_time, uint64_t expiry, data):
    """A complete ADD record."""
    cdef Py_buffer view
    cdef bytes out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _check_length(view.len)
        out = PyBytes_FromStringAndSize(NULL, ADD_OVERHEAD + view.len)
        _fill_add(<unsigned char *>PyBytes_AS_STRING(out), id, flags, add_time, expiry,
                  <const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def encode_op(int opcode, uint64_t id=0):
    """A complete REMOVE/OPEN/CONFIRM/UNREMOVE(id) or FLUSH record (FLUSH ignores ``id``)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _op_size(opcode))
    _fill_op(<unsigned char *>PyBytes_AS_STRING(out), opcode, id)
    return out


def check_record(buffer, Py_ssize_t offset, Py_ssize_t end=-1):
    """What lies at ``offset``: (REC_* status, offset after the record or ``offset``)."""
    cdef Py_buffer view
    cdef Py_ssize_t nxt
    cdef int status
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, offset, end)
        status = _check(<const unsigned char *>view.buf, offset, end, &nxt)
    finally:
        PyBuffer_Release(&view)
    return (status, nxt)


def first_nonzero(buffer, Py_ssize_t start=0, Py_ssize_t end=-1):
    """Offset of the first non-zero byte in [start, end), or -1."""
    cdef Py_buffer view
    cdef Py_ssize_t out
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, start, end)
        with nogil:
            out = _first_nonzero(<const unsigned char *>view.buf, start, end)
    finally:
        PyBuffer_Release(&view)
    return out


def resync(buffer, Py_ssize_t start, Py_ssize_t end=-1):
    """After a failure at ``start``, where records resume, or -1 (nothing valid follows).

    That is the first offset after ``start`` holding a valid record followed by another valid
    record or by a clean end (only zeros): one stray match inside item data is not enough.
    """
    cdef Py_buffer view
    cdef Py_ssize_t out
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, start, end)
        with nogil:
            out = _resync(<const unsigned char *>view.buf, start, end)
    finally:
        PyBuffer_Release(&view)
    return out


def read_add(buffer, Py_ssize_t offset, type cls=tuple):
    """The ADD record at ``offset`` as a ``cls`` of (id, flags, add_time, expiry, data).

    ``cls`` is ``tuple`` or a tuple subclass without instance state (a NamedTuple such as
    RecoveredItem). Raises ValueError if there is no valid ADD record there (CRC checked).
    """
    cdef Py_buffer view
    cdef Py_ssize_t nxt, end
    cdef const unsigned char *buf
    cdef object out, data
    if cls is not tuple and not _plain_tuple_type(cls):
        raise TypeError(f"{cls.__name__} is not a plain tuple subclass")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, offset, -1)
        buf = <const unsigned char *>view.buf
        if _check(buf, offset, end, &nxt) != REC_VALID or buf[offset + 8] != OP_ADD:
            raise ValueError(f"no valid ADD record at offset {offset}")
        data = PyBytes_FromStringAndSize(<const char *>buf + offset + ADD_OVERHEAD,
                                         nxt - offset - ADD_OVERHEAD)
        out = erq_alloc_tuple(cls, 5)
        _set_item(out, 0, erq_load64(buf + offset + 9))
        _set_item(out, 1, erq_load32(buf + offset + 17))
        _set_item(out, 2, erq_load64(buf + offset + 21))
        _set_item(out, 3, erq_load64(buf + offset + 29))
        _set_item(out, 4, data)
    finally:
        PyBuffer_Release(&view)
    return out


cdef class ItemMaker:
    """Makes the items read_adds appends straight from each record, for a module that
    cimports this one and sets ``make`` (the compiled ring: erq._fast._ring.ITEM_MAKER): no
    tuple and no int objects per item on the way to the queue."""


@cython.boundscheck(False)
@cython.wraparound(False)
def read_adds(buffer, const unsigned long long[:] offsets, Py_ssize_t start,
              Py_ssize_t max_bytes, object cls, list out):
    """Append to ``out`` the ADD records at ``offsets[start:]``, in order, each as a ``cls``
    (see read_add) or, with an ItemMaker, as what it makes of (id, flags, add_time, expiry,
    data), while their data fits in ``max_bytes``; if ``out`` is empty the first one is taken
    whatever its size. Returns (index of the first offset not read, data bytes read, True),
    or with False when it stopped at an offset holding no valid ADD record.
    """
    cdef Py_buffer view
    cdef Py_ssize_t i = start, n = offsets.shape[0], got = 0, end, offset, nxt, size
    cdef const unsigned char *buf
    cdef object item
    cdef bint ok = True
    cdef ItemMaker maker = None
    if isinstance(cls, ItemMaker):
        maker = <ItemMaker>cls
        if maker.make is NULL:
            raise TypeError("an ItemMaker without its C function")
    elif not isinstance(cls, type) or (cls is not tuple and not _plain_tuple_type(cls)):
        raise TypeError(f"{cls!r} is not a plain tuple subclass or an ItemMaker")
    if not 0 <= start <= n:
        raise ValueError(f"start {start} outside {n} offsets")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = view.len
        buf = <const unsigned char *>view.buf
        while i < n:
            offset = <Py_ssize_t>offsets[i]
            if offset < 0 or offset >= end or _check(buf, offset, end, &nxt) != REC_VALID \
                    or buf[offset + 8] != OP_ADD:
                ok = False
                break
            size = nxt - offset - ADD_OVERHEAD
            if got + size > max_bytes and (got or len(out)):
                break
            data = PyBytes_FromStringAndSize(<const char *>buf + offset + ADD_OVERHEAD, size)
            if maker is not None:
                item = maker.make(erq_load64(buf + offset + 9), erq_load32(buf + offset + 17),
                                  erq_load64(buf + offset + 21), erq_load64(buf + offset + 29),
                                  data)
            else:
                item = erq_alloc_tuple(<type>cls, 5)
                _set_item(item, 0, erq_load64(buf + offset + 9))
                _set_item(item, 1, erq_load32(buf + offset + 17))
                _set_item(item, 2, erq_load64(buf + offset + 21))
                _set_item(item, 3, erq_load64(buf + offset + 29))
                _set_item(item, 4, data)
            out.append(item)
            got += size
            i += 1
    finally:
        PyBuffer_Release(&view)
    return (i, got, ok)


cdef inline void _set_item(object tup, Py_ssize_t i, object value):
    Py_INCREF(value)  # PyTuple_SET_ITEM steals a reference
    PyTuple_SET_ITEM(tup, i, value)


cdef bint _plain_tuple_type(type cls):
    """A tuple subclass whose instances are bare tuples (NamedTuple): safe to fill in C."""
    return erq_plain_tuple_type(cls)


@cython.boundscheck(False)
@cython.wraparound(False)
def record_offsets(buffer, Py_ssize_t offset, unsigned long long[:] out):
    """Fill ``out`` with the offsets of the records laid end to end from ``offset``, each
    found from the length field of the one before: read-behind's items written back to back
    need no offset of their own. Returns how many were filled. It stops after an offset whose
    record's length cannot be read or runs past the buffer: that one is filled, for the
    reader (which checks each record) to refuse."""
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef Py_ssize_t cap = out.shape[0], filled = 0, size
    cdef uint64_t at
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    at = <uint64_t>offset
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        buf = <const unsigned char *>view.buf
        size = view.len
        while filled < cap:
            out[filled] = at
            filled += 1
            if size < 9 or at > <uint64_t>(size - 9):
                break
            at += 8 + <uint64_t>erq_load32(buf + at)
            if at > <uint64_t>size:
                break
    finally:
        PyBuffer_Release(&view)
    return filled


@cython.boundscheck(False)
@cython.wraparound(False)
def add_data_bytes(buffer, const unsigned long long[:] offsets, Py_ssize_t start=0,
                   Py_ssize_t end=-1):
    """The data bytes of the ADD records at ``offsets[start:end]`` (``end=-1``: to the end),
    from their length fields. Raises ValueError at an offset holding no ADD record there (its
    length, opcode and extent are checked, not its CRC: recovery's replay checked that)."""
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef Py_ssize_t n = offsets.shape[0], i, size
    cdef uint64_t offset, length, total = 0
    if end < 0:
        end = n
    if not 0 <= start <= end <= n:
        raise ValueError(f"bad range [{start}, {end}) of {n} offsets")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        buf = <const unsigned char *>view.buf
        size = view.len
        for i in range(start, end):
            offset = offsets[i]
            if size < 9 or offset > <uint64_t>(size - 9):
                raise ValueError(f"no ADD record at offset {offset}")
            length = erq_load32(buf + offset)
            if buf[offset + 8] != OP_ADD or length < ADD_FIXED_LENGTH \
                    or length > <uint64_t>size - offset - 8:
                raise ValueError(f"no ADD record at offset {offset}")
            total += length - ADD_FIXED_LENGTH
    finally:
        PyBuffer_Release(&view)
    return total


cdef class RecordIterator:
    """Yields (offset, opcode, id, flags, add_time, expiry, data) for each valid record.

    ``data`` is the ADD's bytes (None for other opcodes, or for every record when made with
    ``data=False``). Iteration stops at the first position that is not a valid record;
    ``status`` then says why (REC_END, REC_TORN or REC_BAD; REC_VALID while running) and
    ``position`` is that offset. The buffer is released when iteration stops.
    """

    def __cinit__(self, buffer, Py_ssize_t start=HEADER_SIZE, Py_ssize_t end=-1, bint data=True):
        PyObject_GetBuffer(buffer, &self._view, PyBUF_SIMPLE)
        self._held = True
        try:
            self._end = _bounds(self._view.len, start, end)
        except ValueError:
            self.release()
            raise
        self._pos = start
        self._data = data
        self.status = REC_VALID

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._view)

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t nxt
        cdef int status
        cdef tuple rec
        if not self._held:
            raise StopIteration
        status = _check(<const unsigned char *>self._view.buf, self._pos, self._end, &nxt)
        if status != REC_VALID:
            self.status = status
            self.release()
            raise StopIteration
        rec = _decode(<const unsigned char *>self._view.buf, self._pos, nxt, self._data)
        self._pos = nxt
        return rec

    @property
    def position(self):
        """Offset of the next record to read (where iteration stopped, once it has)."""
        return self._pos

    cpdef release(self):
        if self._held:
            self._held = False
            PyBuffer_Release(&self._view)


def iter_records(buffer, Py_ssize_t start=HEADER_SIZE, Py_ssize_t end=-1, bint data=True):
    """Iterate the records of ``buffer`` from ``start``; see :class:`RecordIterator`."""
    return RecordIterator(buffer, start, end, data)
