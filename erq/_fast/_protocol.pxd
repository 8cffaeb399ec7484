# C types for the compiled build of erq/_protocol_py.py (linked here as _protocol.py; see its
# docstring). The Python source is the behaviour; this file makes the per-read path C: the
# connection's fields are struct fields, the commands' feed is a C call (_commands is cimported
# under the name the source imports the selector as), and so is the parser's feed (c_parser).
cimport erq._fast._commands as _commands
cimport erq._fast._parser as c_parser
cimport erq._fast._session as c_session
cimport erq._fast._state as c_state
cimport erq._fast._wire as _wire

cdef Py_ssize_t _parsed_whole
cdef Py_ssize_t _requests_per_pass


cdef class MemcacheProtocol:
    cdef public c_state.ServerState state
    cdef public object transport
    cdef public c_parser.Parser parser
    cdef public c_session.Session session
    cdef c_state.Counters _counters
    cdef bint _active
    cdef double _last_active
    cdef int _reading_paused
    cdef object _linger
    cdef object _paused_watch
    cdef object _rest
    cdef Py_ssize_t _rest_at

    cdef _set_paused(self, int bit, bint on)
    cdef _unwatch_paused(self)
    cpdef data_received(self, data)  # a C call from erq's epoll layer (erq/_fast/_epoll.pyx)
