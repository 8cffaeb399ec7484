# cython: language_level=3
"""Cython ring-buffer FIFO of Python objects (twin: erq/_ring_py.py).

A C array of owned references, a head index and a count; the capacity is a power of two
so wrap-around is a mask. Growth doubles and re-lays the items from index 0.
"""

cimport cython
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.limits cimport LLONG_MAX
from libc.stdint cimport uint32_t, uint64_t

from erq._fast._records cimport ItemMaker


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define ERQ_PREFETCH(p) __builtin_prefetch(p)
    #else
    #define ERQ_PREFETCH(p) ((void)(p))
    #endif
    #define ERQ_TYPE_OF(p) (((PyObject *)(p))->ob_type)
    """
    void ERQ_PREFETCH(const void *p) nogil
    void *ERQ_TYPE_OF(PyObject *p) nogil


# How many pops ahead `Ring.pop` asks the CPU for an item. A deep queue's items were made
# long before they are taken, so each pop found its Item, then its bytes, out of every cache
# (perf annotate at 50 connections: ~80% of Queue.take's samples on the first load from the
# Item). Item i + PREFETCH_AHEAD is fetched now; its bytes once it is the next head.
cdef enum:
    PREFETCH_AHEAD = 4


# RAM a queued item costs beyond its data: this Item (64 bytes, not GC-tracked), the bytes
# object's header and allocator rounding, the ring slot, and the ring's growth slack. The
# queue counts it against max_memory_size so that the limit bounds real memory.
ITEM_OVERHEAD = 128


@cython.no_gc
@cython.freelist(256)
cdef class Item:
    """One queued value (twin: erq._ring_py.Item). Times are wall-clock ms; expiry 0 = never.

    Not tracked by the cyclic GC: an item holds only ints and its bytes, so it can never be
    part of a cycle, and a deep queue of tracked items makes every full collection scan them.
    """

    def __init__(self, unsigned long long id, object data, unsigned int flags,
                 long long add_time, long long expiry):
        self.id = id
        self.data = data
        self.flags = flags
        self.add_time = add_time
        self.expiry = expiry

    cpdef bint expired(self, long long now):
        return self.expiry != 0 and self.expiry <= now

    def __repr__(self):
        return f"Item(id={self.id}, flags={self.flags}, len={len(self.data)})"


cpdef Item new_item(unsigned long long id, object data, unsigned int flags,
                    long long add_time, long long expiry):
    """``Item(id, data, flags, add_time, expiry)`` as a C call, for the compiled queue: a set
    through the class call boxes its times into Python ints and builds an argument tuple."""
    cdef Item item = Item.__new__(Item)
    item.id = id
    item.data = data
    item.flags = flags
    item.add_time = add_time
    item.expiry = expiry
    return item


cdef object _item_of_record(uint64_t id, uint32_t flags, uint64_t add_time, uint64_t expiry,
                            object data):
    if add_time > <uint64_t>LLONG_MAX or expiry > <uint64_t>LLONG_MAX:
        raise OverflowError("an item's time does not fit a signed 64-bit integer")
    return new_item(id, data, flags, <long long>add_time, <long long>expiry)


cdef ItemMaker _maker = ItemMaker()
_maker.make = _item_of_record
# For the journal's read_behind: items read back come out of their records as Items, made
# in C (no tuple, no int objects per item; the twin's is a plain call).
ITEM_MAKER = _maker


cdef class Ring:
    def __cinit__(self, Py_ssize_t capacity=16):
        cdef Py_ssize_t cap = 4
        if capacity > PY_SSIZE_T_MAX // <Py_ssize_t>sizeof(PyObject*):
            raise MemoryError()  # doubling up to it would wrap (and spin at 0)
        while cap < capacity:
            cap <<= 1
        self._buf = <PyObject**>PyMem_Calloc(cap, sizeof(PyObject*))
        if self._buf == NULL:
            raise MemoryError()
        self._cap = cap
        self._min_cap = cap
        self._head = 0
        self._count = 0

    def __dealloc__(self):
        if self._buf != NULL:
            self._release()
            PyMem_Free(self._buf)
            self._buf = NULL

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef void _release(self):
        cdef Py_ssize_t i, mask = self._cap - 1
        cdef PyObject* obj
        for i in range(self._count):
            obj = self._buf[(self._head + i) & mask]
            self._buf[(self._head + i) & mask] = NULL  # before the decref, which may run code
            Py_XDECREF(obj)

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count > 0

    @property
    def capacity(self):
        return self._cap

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _grow(self) except -1:
        return self._move_to(self._cap * 2)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _move_to(self, Py_ssize_t newcap) except -1:
        """Move the items, in order from index 0, into a new array of ``newcap`` slots."""
        cdef Py_ssize_t i
        cdef PyObject** nb = <PyObject**>PyMem_Calloc(newcap, sizeof(PyObject*))
        if nb == NULL:
            raise MemoryError()
        for i in range(self._count):
            nb[i] = self._buf[(self._head + i) & (self._cap - 1)]
        PyMem_Free(self._buf)
        self._buf = nb
        self._cap = newcap
        self._head = 0
        return 0

    cpdef push(self, object item):
        if self._count == self._cap:
            self._grow()
        Py_INCREF(item)
        self._buf[(self._head + self._count) & (self._cap - 1)] = <PyObject*>item
        self._count += 1

    cpdef push_front(self, object item):
        if self._count == self._cap:
            self._grow()
        Py_INCREF(item)
        self._head = (self._head - 1) & (self._cap - 1)
        self._buf[self._head] = <PyObject*>item
        self._count += 1

    cpdef object pop(self):
        if self._count == 0:
            raise IndexError("pop from an empty Ring")
        cdef Py_ssize_t mask = self._cap - 1
        cdef PyObject* p = self._buf[self._head]
        cdef PyObject* nxt
        self._buf[self._head] = NULL
        self._head = (self._head + 1) & mask
        self._count -= 1
        if self._count > PREFETCH_AHEAD:
            ERQ_PREFETCH(self._buf[(self._head + PREFETCH_AHEAD) & mask])
        if self._count:
            nxt = self._buf[self._head]  # fetched PREFETCH_AHEAD pops ago
            if ERQ_TYPE_OF(nxt) == <void*>Item:
                ERQ_PREFETCH(<PyObject*>(<Item>nxt).data)
        cdef object item = <object>p
        Py_XDECREF(p)  # the array's reference; `item` holds its own
        return item

    cpdef object peek(self):
        if self._count == 0:
            raise IndexError("peek at an empty Ring")
        return <object>self._buf[self._head]

    cpdef object peek_tail(self):
        if self._count == 0:
            raise IndexError("peek at an empty Ring")
        return <object>self._buf[(self._head + self._count - 1) & (self._cap - 1)]

    cpdef clear(self):
        """Empty the ring before its items are released: releasing one may run code (a
        ``__del__``) that uses the ring, which then finds it empty and whole, as the twin's
        does. The new array comes first: should it not, MemoryError, the ring unchanged."""
        cdef PyObject** old = self._buf
        cdef Py_ssize_t i, head = self._head, count = self._count, mask = self._cap - 1
        cdef PyObject** fresh = <PyObject**>PyMem_Calloc(self._min_cap, sizeof(PyObject*))
        if fresh == NULL:
            raise MemoryError()
        self._buf = fresh
        self._cap = self._min_cap
        self._head = 0
        self._count = 0
        for i in range(count):
            Py_XDECREF(old[(head + i) & mask])
        PyMem_Free(old)

    cpdef bint shrink(self) except -1:
        """Give back the room of a ring that grew for a burst and has drained: once a
        quarter or less of it is used, it moves into the smallest power of two that is at
        least its initial size and twice its count. True if it moved. (Called by the periodic
        sweep, not by pop: the hot path stays a store and a decrement.)"""
        cdef Py_ssize_t newcap = self._min_cap
        if self._cap <= self._min_cap or self._count > self._cap // 4:
            return False
        while newcap < self._count * 2:
            newcap <<= 1
        if newcap >= self._cap:
            return False
        self._move_to(newcap)
        return True

    def __iter__(self):
        return iter(self.to_list())

    cpdef list to_list(self):
        cdef Py_ssize_t i
        cdef list out = []
        for i in range(self._count):
            out.append(<object>self._buf[(self._head + i) & (self._cap - 1)])
        return out
