# cython: language_level=3
# The C level of erq/_fast/_records.pyx, cimported by _replay.pyx and _append.pyx: the record
# layout's constants and the primitives that read and write records without Python objects.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "crc32c.h":
    # Only _records.pyx calls the CRC (its tables and CPU dispatch are per module); the loads
    # and stores are plain inline functions, free for every module.
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
    NOGIL_THRESHOLD = 65536


cdef int _check(const unsigned char *buf, Py_ssize_t p, Py_ssize_t end,
                Py_ssize_t *nxt) noexcept nogil
cdef Py_ssize_t _first_nonzero(const unsigned char *buf, Py_ssize_t p,
                               Py_ssize_t end) noexcept nogil
cdef Py_ssize_t _resync(const unsigned char *buf, Py_ssize_t start, Py_ssize_t end) noexcept nogil
cdef Py_ssize_t _bounds(Py_ssize_t size, Py_ssize_t start, Py_ssize_t end) except -1
cdef tuple _decode(const unsigned char *buf, Py_ssize_t p, Py_ssize_t nxt, bint want_data)
cdef void _fill_add(unsigned char *p, uint64_t id, uint32_t flags, uint64_t add_time,
                    uint64_t expiry, const unsigned char *data, Py_ssize_t n) noexcept nogil
cdef Py_ssize_t _pwrite_add(int fd, unsigned char *p, Py_ssize_t at, uint64_t id,
                            uint32_t flags, uint64_t add_time, uint64_t expiry,
                            const unsigned char *data, Py_ssize_t n, int *err) noexcept nogil
cdef int _write_failed(int err, Py_ssize_t got, Py_ssize_t want, Py_ssize_t at) except -1
cdef void _fill_op(unsigned char *p, int opcode, uint64_t id) noexcept nogil


# How read_adds makes an object of an ADD record without a tuple (the compiled ring's items).
ctypedef object (*make_item_t)(uint64_t id, uint32_t flags, uint64_t add_time, uint64_t expiry,
                               object data)


cdef class ItemMaker:
    cdef make_item_t make


cdef class RecordIterator:
    # A read-only buffer export, released as soon as iteration stops.
    cdef Py_buffer _view
    cdef bint _held
    cdef bint _data
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _end
    cdef readonly int status

    cpdef release(self)


# Pure arithmetic, so defined here: inlined into every module that cimports them.
cdef inline int _check_length(Py_ssize_t n) except -1:
    """Raise unless ``n`` bytes of item data fit in a record (its length field is 32 bits)."""
    if <uint64_t>n + ADD_FIXED_LENGTH > <uint64_t>0xFFFFFFFF:
        raise OverflowError("item too large for a journal record")
    return 0


cdef inline Py_ssize_t _op_size(int opcode) except -1:
    if opcode == OP_FLUSH:
        return FLUSH_RECORD_SIZE
    if OP_REMOVE <= opcode <= OP_UNREMOVE:
        return OP_RECORD_SIZE
    raise ValueError(f"not an id opcode: {opcode}")
