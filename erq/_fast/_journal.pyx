# cython: language_level=3
"""Journal record codec and mmap'd segment appender: the C twin of erq/journal/_codec_py.py.

Same names, same behaviour; the pure-Python module is the reference. Records are encoded
straight into the segment's mmap (one memcpy of the item data) or, for large items, written
with pwritev() on the segment's file; CRC32C runs in C (SSE4.2 when the CPU has it), and the
reader walks raw pointers. Layout: erq/journal/format.py.
"""

import errno as _errno
import os
from mmap import mmap

from ..journal_api import JournalError

cimport cython
from cpython.array cimport array, clone, resize_smart
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset
from posix.mman cimport MADV_DONTNEED, madvise
from posix.uio cimport iovec, pwritev
from posix.unistd cimport _SC_PAGESIZE, sysconf


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


cdef extern from "crc32c.h":
    void erq_crc32c_init()
    int erq_crc32c_uses_hw
    uint32_t erq_crc32c(uint32_t crc, const unsigned char *p, size_t n) nogil
    uint32_t erq_crc32c_portable(uint32_t crc, const unsigned char *p, size_t n) nogil
    uint32_t erq_load32(const unsigned char *p) nogil
    uint64_t erq_load64(const unsigned char *p) nogil
    void erq_store32(unsigned char *p, uint32_t v) nogil
    void erq_store64(unsigned char *p, uint64_t v) nogil


# Mirrors erq/journal/format.py (the tests encode with one twin and decode with the other).
cdef enum:
    HEADER_SIZE = 32
    OP_ADD = 1
    OP_REMOVE = 2
    OP_OPEN = 3
    OP_CONFIRM = 4
    OP_UNREMOVE = 5
    OP_FLUSH = 6
    ADD_FIXED_LENGTH = 29
    ADD_OVERHEAD = 37
    OP_RECORD_SIZE = 17
    FLUSH_RECORD_SIZE = 9
    REC_VALID = 0
    REC_END = 1
    REC_TORN = 2
    REC_BAD = 3

# Above this many bytes a copy or CRC runs without the GIL (fsync/compaction threads go on).
cdef Py_ssize_t NOGIL_THRESHOLD = 1 << 16
# A trimming writer drops the pages behind it from the process every this many bytes, so a
# journal's resident memory stays small however much is written through the mapping.
cdef Py_ssize_t TRIM_STEP = 1 << 20
cdef Py_ssize_t PAGE = sysconf(_SC_PAGESIZE)
# A writer given the segment's fd writes an ADD whose data is at least this long with pwritev()
# instead of copying it into the mapping. A first store into a page of the mapping costs a page
# fault (the kernel zero-fills the page, the filesystem runs page_mkwrite) before the copy
# overwrites it; pwritev() copies straight into the page cache. Server CPU per set with every
# ADD pwritev()'d against every ADD copied (erq serve, one connection, 64 sets in flight, fsync
# period): 4 KiB +25%, 8 KiB +1..17%, 12 KiB even, 16 KiB -11..17%, 24 KiB -20%, 64 KiB -28%.
cdef Py_ssize_t PWRITE_MIN = 16384
PWRITE_THRESHOLD = PWRITE_MIN
cdef uint64_t MAX_LENGTH = 0xFFFFFFFF

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


cdef inline Py_ssize_t _bounds(Py_ssize_t size, Py_ssize_t start, Py_ssize_t end) except -1:
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


cdef Py_ssize_t _op_size(int opcode) except -1:
    if opcode == OP_FLUSH:
        return FLUSH_RECORD_SIZE
    if OP_REMOVE <= opcode <= OP_UNREMOVE:
        return OP_RECORD_SIZE
    raise ValueError(f"not an id opcode: {opcode}")


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
        if <uint64_t>view.len + ADD_FIXED_LENGTH > MAX_LENGTH:
            raise OverflowError("item too large for a journal record")
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


@cython.boundscheck(False)
@cython.wraparound(False)
def read_adds(buffer, const unsigned long long[:] offsets, Py_ssize_t start,
              Py_ssize_t max_bytes, type cls, list out):
    """Append to ``out`` the ADD records at ``offsets[start:]``, in order, each as a ``cls``
    (see read_add), while their data fits in ``max_bytes``; if ``out`` is empty the first
    one is taken whatever its size. Returns (index of the first offset not read, data bytes
    read, True), or with False when it stopped at an offset holding no valid ADD record.
    """
    cdef Py_buffer view
    cdef Py_ssize_t i = start, n = offsets.shape[0], got = 0, end, offset, nxt, size
    cdef const unsigned char *buf
    cdef object item
    cdef bint ok = True
    if cls is not tuple and not _plain_tuple_type(cls):
        raise TypeError(f"{cls.__name__} is not a plain tuple subclass")
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
            item = erq_alloc_tuple(cls, 5)
            _set_item(item, 0, erq_load64(buf + offset + 9))
            _set_item(item, 1, erq_load32(buf + offset + 17))
            _set_item(item, 2, erq_load64(buf + offset + 21))
            _set_item(item, 3, erq_load64(buf + offset + 29))
            _set_item(item, 4, PyBytes_FromStringAndSize(<const char *>buf + offset + ADD_OVERHEAD,
                                                         size))
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


# The position of a removed ReplayTail entry: no record is ever there.
cdef uint64_t TOMBSTONE = 0xFFFFFFFFFFFFFFFF
# ReplayTail.COMPACT_MIN: the tombstones that an add compacts once they outnumber live entries.
cdef enum:
    REPLAY_COMPACT_MIN = 1024
cdef array _U64 = array("Q")  # the template of ReplayTail's arrays


cdef class ReplayTail:
    """Recovery's queued ids in ADD order, each with the position of its ADD record: the
    replay state of a queue's tail in two arrays of unsigned 64-bit ints (16 bytes per entry)
    instead of a dict of Python ints (about 110).

    ``add`` appends an id that is not queued; ``pop`` removes one wherever it is and returns
    its position (None if it is not queued); ``in`` and ``len`` see the queued ids; iteration
    gives them in ADD order, ``items()`` with their positions; ``take_positions()`` hands the
    positions over (an ``array('Q')``, not copied) and empties the tail; ``clear()`` is FLUSH.

    A removed entry becomes a tombstone (position 2**64 - 1); ``_cursor`` is the first live
    entry, so removing the oldest (the FIFO common case) costs O(1). Another id is found by
    bisection in the runs of strictly increasing ids (one run for a journal written by one
    server, a few after a compaction snapshot that wrote the queue in its own order); past
    RUN_LIMIT runs a dict id -> index is built and kept up to date instead. An add first
    compacts the arrays when the tombstones number at least COMPACT_MIN and outnumber the
    live entries, so the arrays stay within about twice the live entries however often the
    queue drains and refills; when the last live entry goes the tail starts afresh.
    ``slots`` (entries held, tombstones included) and ``indexed`` show that bookkeeping.
    The pure twin follows the same rules, so both report the same ``slots`` and ``indexed``.
    """

    RUN_LIMIT = REPLAY_RUN_LIMIT
    COMPACT_MIN = REPLAY_COMPACT_MIN

    def __cinit__(self):
        self._reset()

    cdef int _reset(self) except -1:
        self._ids = clone(_U64, 0, False)
        self._positions = clone(_U64, 0, False)
        self._n = self._cursor = self._live = self._nruns = 0
        self._index = None
        return 0

    def __len__(self):
        return self._live

    def __contains__(self, id):
        if not isinstance(id, int) or id < 0 or id > TOMBSTONE:
            return False
        return self._find(id) >= 0

    def __iter__(self):
        # Index by index through the current arrays: no stale pointer if the tail changes.
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                yield self._ids.data.as_ulonglongs[i]
            i += 1

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        cdef Py_ssize_t i = self._cursor
        while i < self._n:
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                yield self._ids.data.as_ulonglongs[i], self._positions.data.as_ulonglongs[i]
            i += 1

    @property
    def slots(self):
        """Entries held in the arrays: the queued ids and the tombstones not compacted yet."""
        return self._n

    @property
    def indexed(self):
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    def add(self, id, position):
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        cdef uint64_t key, value
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")  # not truncated, as a float would be
        if id < 0 or position < 0 or id > TOMBSTONE or position > TOMBSTONE:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        key, value = id, position
        if value == TOMBSTONE:
            raise ValueError("position 2**64 - 1 marks a removed entry")
        if self._find(key) >= 0:
            raise ValueError(f"id {id} is already queued")
        self._append(key, value)

    def pop(self, id):
        """Remove ``id``; its position, or None if it was not queued."""
        cdef Py_ssize_t i
        cdef uint64_t position
        if not isinstance(id, int) or id < 0 or id > TOMBSTONE:
            return None
        i = self._find(id)
        if i < 0:
            return None
        self._pop_at(i, id, &position)
        return position

    def clear(self):
        self._reset()

    def take_positions(self):
        """The positions of the queued ids in ADD order, as an ``array('Q')``; the tail is
        left empty (its storage is handed over, not copied)."""
        self._squeeze()
        out = self._positions
        self._reset()
        return out

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _find(self, uint64_t id) except -2:
        """Index of the live entry of ``id``, or -1."""
        cdef const unsigned long long *ids
        cdef const unsigned long long *positions
        cdef Py_ssize_t cursor = self._cursor, k, start, end, lo, hi, mid
        cdef object found
        if self._live == 0:
            return -1
        if self._index is not None:
            found = self._index.get(id)
            return -1 if found is None else <Py_ssize_t>found
        ids = self._ids.data.as_ulonglongs
        if ids[cursor] == id:
            return cursor
        positions = self._positions.data.as_ulonglongs
        for k in range(self._nruns):
            start = self._runs[k]
            end = self._runs[k + 1] if k + 1 < self._nruns else self._n
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            if id < ids[lo] or id > ids[end - 1]:
                continue
            hi = end
            while lo < hi:  # bisect_left: ids[end - 1] >= id, so lo < end
                mid = lo + ((hi - lo) >> 1)
                if ids[mid] < id:
                    lo = mid + 1
                else:
                    hi = mid
            if ids[lo] == id and positions[lo] != TOMBSTONE:
                return lo
        return -1

    cdef int _append(self, uint64_t id, uint64_t position) except -1:
        """Add an entry for ``id``, which the caller knows is not queued."""
        cdef Py_ssize_t n = self._n
        cdef Py_ssize_t dead = n - self._live
        if dead >= REPLAY_COMPACT_MIN and dead > self._live:
            self._compact()
            n = self._n
        if n == 0:
            self._runs[0] = 0
            self._nruns = 1
        elif self._index is None and id <= self._ids.data.as_ulonglongs[n - 1]:
            self._new_run(n)
        resize_smart(self._ids, n + 1)
        resize_smart(self._positions, n + 1)
        self._ids.data.as_ulonglongs[n] = id
        self._positions.data.as_ulonglongs[n] = position
        self._n = n + 1
        self._live += 1
        if self._index is not None:
            self._index[id] = n
        return 0

    cdef int _new_run(self, Py_ssize_t start) except -1:
        cdef Py_ssize_t k = 0
        while k + 1 < self._nruns and self._runs[k + 1] <= self._cursor:  # runs wholly removed
            k += 1
        if k:
            memmove(self._runs, self._runs + k, (self._nruns - k) * sizeof(Py_ssize_t))
            self._nruns -= k
        if self._nruns < REPLAY_RUN_LIMIT:
            self._runs[self._nruns] = start
            self._nruns += 1
        else:
            self._build_index()
        return 0

    cdef int _build_index(self) except -1:
        cdef dict index = {}
        cdef Py_ssize_t i
        for i in range(self._cursor, self._n):
            if self._positions.data.as_ulonglongs[i] != TOMBSTONE:
                index[self._ids.data.as_ulonglongs[i]] = i
        self._index = index
        self._nruns = 0
        return 0

    cdef int _pop_at(self, Py_ssize_t i, uint64_t id, uint64_t *position) except -1:
        cdef unsigned long long *positions = self._positions.data.as_ulonglongs
        position[0] = positions[i]
        positions[i] = TOMBSTONE
        self._live -= 1
        if self._live == 0:
            self._reset()
            return 0
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while positions[i] == TOMBSTONE:  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return 0

    cdef int _squeeze(self) except -1:
        """Move the live entries to the front, in order, dropping every tombstone."""
        cdef unsigned long long *ids = self._ids.data.as_ulonglongs
        cdef unsigned long long *positions = self._positions.data.as_ulonglongs
        cdef Py_ssize_t i, j = 0
        for i in range(self._cursor, self._n):
            if positions[i] != TOMBSTONE:
                ids[j] = ids[i]
                positions[j] = positions[i]
                j += 1
        self._n = j
        self._cursor = 0
        resize_smart(self._ids, j)
        resize_smart(self._positions, j)
        return 0

    cdef int _compact(self) except -1:
        cdef const unsigned long long *ids
        cdef Py_ssize_t i
        self._squeeze()
        ids = self._ids.data.as_ulonglongs
        # Where ids[i] <= ids[i - 1] a run starts: at most RUN_LIMIT runs, or the index.
        self._runs[0] = 0
        self._nruns = 1
        self._index = None
        for i in range(1, self._n):
            if ids[i] <= ids[i - 1]:
                if self._nruns == REPLAY_RUN_LIMIT:
                    self._build_index()
                    return 0
                self._runs[self._nruns] = i
                self._nruns += 1
        return 0


def replay_records(buffer, Py_ssize_t start, Py_ssize_t end, uint64_t base,
                   ReplayTail tail not None, dict head, dict opened, uint64_t max_id,
                   list duplicates):
    """Apply the valid records from ``start`` to recovery's replay state; stop at the first
    position that is not a valid record. Returns (status, that position, greatest id seen).

    ``tail`` (this module's ReplayTail) holds the queued ids in ADD order with ``base +
    offset`` of their ADD; ``head`` maps the ids put back by UNREMOVE to theirs (the queue
    order is its reverse insertion order); ``opened`` the open reads, in OPEN order. An ADD
    of an id already live is not applied; its offset goes to ``duplicates``. Ids never seen
    are ignored.
    """
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef Py_ssize_t pos = start
    cdef Py_ssize_t nxt, i
    cdef int status, op
    cdef uint64_t id, position
    cdef object key, value
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        end = _bounds(view.len, start, end)
        buf = <const unsigned char *>view.buf
        while True:
            status = _check(buf, pos, end, &nxt)
            if status != REC_VALID:
                break
            op = buf[pos + 8]
            if op == OP_FLUSH:
                tail._reset()
                head.clear()
                pos = nxt
                continue
            id = erq_load64(buf + pos + 9)
            # Python ints are made only for head and opened: the tail's common case (an ADD
            # of a new id, the removal of the oldest) makes no object at all.
            if op == OP_ADD:
                if id <= max_id and (tail._find(id) >= 0 or id in head or id in opened):
                    duplicates.append(pos)
                else:
                    tail._append(id, base + <uint64_t>pos)
            elif op == OP_REMOVE:
                i = tail._find(id)
                if i >= 0:
                    tail._pop_at(i, id, &position)
                else:
                    key = id
                    if head.pop(key, None) is None:
                        opened.pop(key, None)
            elif op == OP_OPEN:
                i = tail._find(id)
                if i >= 0:
                    tail._pop_at(i, id, &position)
                    opened[id] = position
                else:
                    key = id
                    value = head.pop(key, None)
                    if value is not None:
                        opened[key] = value
            elif op == OP_CONFIRM:
                if opened:
                    opened.pop(id, None)
            else:  # OP_UNREMOVE
                value = opened.pop(id, None)
                if value is not None:
                    head[id] = value
            if id > max_id:
                max_id = id
            pos = nxt
    finally:
        PyBuffer_Release(&view)
    return (status, pos, max_id)


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


cdef class SegmentWriter:
    """Appends records to a writable buffer (a segment's mmap) from ``position`` on.

    A record copied into the buffer gets its length field last, so one interrupted half-way
    still reads as the end of the data (length 0 in a zero-filled segment). ``append_*``
    return the record's offset, or -1 when it does not fit in what is left (nothing is
    written then). With ``trim`` (only for a shared file mapping: private memory would lose
    the data) the pages behind the write position are dropped from the process now and then;
    they stay in the page cache and the file.

    ``fd`` (with an mmap ``buffer`` only; -1: none) is the file ``buffer`` maps, shared, from
    offset 0. An ADD whose data is at least PWRITE_THRESHOLD bytes is then written with one
    pwritev() on it, which spares the page faults of first stores into the mapping; the
    bytes are the same and the mapping sees them (one page cache). That write carries the
    length with the rest: a record cut short by a crash fails its CRC instead, which
    recovery treats as it treats a zero length followed by data (a torn record). If the
    write fails (disk full, I/O error, short write) the bytes that landed are zeroed again,
    the writer is unchanged, and JournalError is raised. The writer never closes ``fd``.
    """

    def __cinit__(self, buffer, Py_ssize_t position=HEADER_SIZE, bint trim=False, int fd=-1):
        if fd < -1:
            raise ValueError(f"bad file descriptor {fd}")
        if fd >= 0 and not isinstance(buffer, mmap):
            raise TypeError("SegmentWriter writes through a file descriptor only for an mmap")
        try:
            PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        except (BufferError, TypeError):
            raise TypeError("SegmentWriter needs a writable buffer") from None
        self._held = True
        if not 0 <= position <= self._view.len:
            self.release()
            raise ValueError(f"position {position} outside a buffer of {self._view.len} bytes")
        self._pos = position
        self._fd = fd
        memset(self._ops, 0, sizeof(self._ops))
        # Only an mmap (page-aligned) is ever trimmed: dropping pages of private memory
        # would lose their contents.
        self._trim = trim and isinstance(buffer, mmap) and (<size_t>self._view.buf) % PAGE == 0
        self._trimmed = position - position % PAGE

    cdef void _drop_behind(self) noexcept:
        cdef Py_ssize_t upto = self._pos - self._pos % PAGE
        if upto > self._trimmed:
            madvise(<char *>self._view.buf + self._trimmed, upto - self._trimmed, MADV_DONTNEED)
            self._trimmed = upto

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._view)

    cpdef long long append_add(self, uint64_t id, uint32_t flags, uint64_t add_time,
                               uint64_t expiry, object data) except -2:
        cdef Py_buffer view
        cdef Py_ssize_t size, at, got
        cdef unsigned char *p
        cdef int fd = self._fd
        cdef int err = 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len + ADD_FIXED_LENGTH > MAX_LENGTH:
                raise OverflowError("item too large for a journal record")
            if not self._held:
                raise ValueError("SegmentWriter was released")
            size = ADD_OVERHEAD + view.len
            if size > self._view.len - self._pos:
                return -1
            at = self._pos
            p = <unsigned char *>self._view.buf + at
            if fd >= 0 and view.len >= PWRITE_MIN:
                with nogil:
                    got = _pwrite_add(fd, p, at, id, flags, add_time, expiry,
                                      <const unsigned char *>view.buf, view.len, &err)
                if got != size:
                    _write_failed(err, got, size, at)
            elif view.len > NOGIL_THRESHOLD:
                with nogil:
                    _fill_add(p, id, flags, add_time, expiry, <const unsigned char *>view.buf,
                              view.len)
            else:
                _fill_add(p, id, flags, add_time, expiry, <const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        self._pos = at + size
        self._adds += 1
        self._add_bytes += size
        if id > self._max_id:
            self._max_id = id
        if self._trim and self._pos - self._trimmed >= TRIM_STEP:
            self._drop_behind()
        return at

    cpdef long long append_op(self, int opcode, uint64_t id=0) except -2:
        cdef Py_ssize_t size = _op_size(opcode)
        cdef Py_ssize_t at = self._pos
        if not self._held:
            raise ValueError("SegmentWriter was released")
        if size > self._view.len - at:
            return -1
        _fill_op(<unsigned char *>self._view.buf + at, opcode, id)
        self._pos = at + size
        self._ops[opcode] += 1
        if self._trim and self._pos - self._trimmed >= TRIM_STEP:
            self._drop_behind()
        return at

    def counters(self):
        """What was appended: (ADD records, their bytes, greatest ADD id, REMOVE, OPEN,
        CONFIRM, UNREMOVE, FLUSH records)."""
        return (self._adds, self._add_bytes, self._max_id, self._ops[2], self._ops[3],
                self._ops[4], self._ops[5], self._ops[6])

    @property
    def position(self):
        return self._pos

    @property
    def remaining(self):
        return self._view.len - self._pos if self._held else 0

    cpdef release(self):
        """Give the buffer back (an mmap cannot close while a writer holds it)."""
        if self._held:
            self._held = False
            self._fd = -1
            PyBuffer_Release(&self._view)


# ---- the journal's append path -------------------------------------------------------------

cdef inline long long _writer_add(object writer, uint64_t id, uint32_t flags, uint64_t add_time,
                                  uint64_t expiry, object data) except -2:
    """``writer.append_add(...)``: a direct C call when it is this module's SegmentWriter."""
    if isinstance(writer, SegmentWriter):
        return (<SegmentWriter>writer).append_add(id, flags, add_time, expiry, data)
    return writer.append_add(id, flags, add_time, expiry, data)


cdef inline long long _writer_op(object writer, int opcode, uint64_t id) except -2:
    if isinstance(writer, SegmentWriter):
        return (<SegmentWriter>writer).append_op(opcode, id)
    return writer.append_op(opcode, id)


cdef class AppendCore:
    """The per-append path of QueueJournal, which subclasses it: write the record into the
    current segment and return None, all in C while the record fits and ``_quiet`` holds.

    The subclass provides the slow paths, called only when needed: ``_rotate(record_size)``
    (seal the full segment, return the new writer), ``_written()`` (the fsync policy's
    bookkeeping; returns a ticket or None), and ``_disk`` / ``_segments`` for items kept only
    on disk. ``_writer`` may be any object with SegmentWriter's API (the pure twin's too).
    """

    cpdef object add(self, uint64_t id, uint32_t flags, uint64_t add_time, uint64_t expiry,
                     object data, bint in_memory=True):
        """Journal a new item at the tail. ``in_memory=False``: the queue keeps it only here,
        to be handed back by ``read_behind``. Returns a ticket (``fsync="always"``) or None;
        raises JournalError when the record cannot be written (disk full)."""
        cdef long long offset = _writer_add(self._writer, id, flags, add_time, expiry, data)
        if offset < 0:
            writer = (<object>self)._rotate(ADD_OVERHEAD + len(data))
            offset = _writer_add(writer, id, flags, add_time, expiry, data)
        if not in_memory:
            (<object>self)._disk.push((<object>self)._segments[-1], offset, len(data))
        if self._quiet:
            return None
        if self._ticket is not None:  # the batch to come covers this append too
            return self._ticket
        return (<object>self)._written()

    cpdef object remove(self, uint64_t id):
        """The item left the queue for good (plain get, expiry, discard)."""
        return self._op(OP_REMOVE, id)

    cpdef object open(self, uint64_t id):
        """The item was handed out as a reliable read."""
        return self._op(OP_OPEN, id)

    cpdef object confirm(self, uint64_t id):
        """An open read was confirmed: the item is gone for good."""
        return self._op(OP_CONFIRM, id)

    cpdef object unremove(self, uint64_t id):
        """An open read was aborted: the item is back at the head of the queue."""
        return self._op(OP_UNREMOVE, id)

    def _append_op(self, opcode, id):
        """Write a record of ``opcode`` (FLUSH too), rotating if it does not fit; no fsync
        bookkeeping. Not on the per-request path: plain Python calls."""
        if self._writer.append_op(opcode, id) < 0:
            (<object>self)._rotate(OP_RECORD_SIZE).append_op(opcode, id)

    cdef object _op(self, int opcode, uint64_t id):
        if _writer_op(self._writer, opcode, id) < 0:
            _writer_op((<object>self)._rotate(OP_RECORD_SIZE), opcode, id)
        if self._quiet:
            return None
        if self._ticket is not None:  # the batch to come covers this append too
            return self._ticket
        return (<object>self)._written()
