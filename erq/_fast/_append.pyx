# cython: language_level=3
"""The journal's append path: records written into a segment's mapping (or, for a large item,
with pwritev() on its file), and the per-request appends QueueJournal inherits. The C twin
of erq/journal/_append_py.py (same names, same behaviour; the pure-Python module is the
reference).
"""

import logging
from mmap import mmap

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset
from posix.mman cimport MADV_DONTNEED, madvise
from posix.unistd cimport _SC_PAGESIZE, sysconf

from erq._fast._records cimport (
    ADD_OVERHEAD,
    HEADER_SIZE,
    NOGIL_THRESHOLD,
    OP_CONFIRM,
    OP_OPEN,
    OP_RECORD_SIZE,
    OP_REMOVE,
    OP_UNREMOVE,
    _check_length,
    _fill_add,
    _fill_op,
    _op_size,
    _pwrite_add,
    _write_failed,
)

_log = logging.getLogger("erq.journal")

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
            _check_length(view.len)
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


cdef class Ticket:
    """The durability of one journal's appends in one batch (fsync = always; see
    ``erq.journal.commit``). Same API as the pure twin's: ``done``, ``error`` (None or the
    JournalError of a failed sync), ``waiters`` (callables run in order when it resolves)."""

    def __cinit__(self):
        self.done = False
        self.error = None
        self.waiters = []

    cpdef add_waiter(self, object callback):
        """Call ``callback(ticket)`` once the ticket resolves (now if it has)."""
        if self.done:
            callback(self)
        else:
            self.waiters.append(callback)

    cpdef resolve(self, object error):
        """Settle the ticket and call its waiters."""
        self.done = True
        self.error = error
        self.notify()

    cpdef notify(self):
        """Call the waiters of a settled ticket (once)."""
        cdef list waiters = self.waiters
        self.waiters = []
        for waiter in waiters:
            try:
                waiter(self)
            except Exception:  # one broken waiter must not keep the others' replies back
                _log.exception("a commit ticket's waiter failed")

    def __repr__(self):
        state = "pending" if not self.done else "failed" if self.error else "synced"
        return f"<Ticket {state}, {len(self.waiters)} waiting>"


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
