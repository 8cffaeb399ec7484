# C types for the compiled build of erq/_keys_py.py (linked here as _keys.py; see its
# docstring): a KeySpec is a struct whose flags the compiled commands read as C fields.


cdef class KeySpec:
    cdef public bytes key
    cdef public object name
    cdef public bytes prefix
    cdef public bytes kestrel_prefix
    cdef public object timeout
    cdef public bint open
    cdef public bint close
    cdef public bint abort
    cdef public bint peek
    cdef public bint fetches


cpdef KeySpec parse_key(bytes key)

# Hot keys' specs: a dict, so the per-request lookup is a C dict call.
cdef dict _cache
