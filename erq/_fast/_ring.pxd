from cpython.ref cimport PyObject


cdef class Item:
    cdef public unsigned long long id
    cdef public object data
    cdef public unsigned int flags
    cdef public long long add_time
    cdef public long long expiry

    cpdef bint expired(self, long long now)


cpdef Item new_item(unsigned long long id, object data, unsigned int flags,
                    long long add_time, long long expiry)


cdef class Ring:
    cdef PyObject** _buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _min_cap
    cdef Py_ssize_t _head
    cdef Py_ssize_t _count

    cdef void _release(self)
    cdef int _grow(self) except -1
    cdef int _move_to(self, Py_ssize_t newcap) except -1
    cpdef push(self, object item)
    cpdef push_front(self, object item)
    cpdef object pop(self)
    cpdef object peek(self)
    cpdef object peek_tail(self)
    cpdef clear(self)
    cpdef bint shrink(self) except -1
    cpdef list to_list(self)
