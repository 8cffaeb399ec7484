# C types for the compiled build of erq/_session_py.py (linked here as _session.py; see its
# docstring). The Python source is the behaviour; this file makes its attributes struct fields
# and its methods C calls for the compiled commands module, which cimports it.

cimport cython

cimport erq._fast._append as c_append
cimport erq._fast._queues as c_queues
cimport erq._fast._state as c_state
cimport erq._fast._wire as _wire


cdef Py_ssize_t _requests_per_pass
cdef Py_ssize_t _max_unsent
cdef Py_ssize_t _waits_looked_at

cpdef Py_ssize_t set_data_size(tuple request) except -1
cpdef Py_ssize_t request_size(tuple request) except -1


cdef class Session:
    cdef public c_state.ServerState state
    cdef public object dispatch
    cdef public list out
    cdef public object pending
    cdef public Py_ssize_t pending_bytes
    cdef public Py_ssize_t pending_data
    cdef public object blocked
    cdef public bint closing
    cdef public bint closed
    cdef public dict open_reads
    cdef public object last_key
    cdef public tuple last_specs
    cdef Py_ssize_t _names_bound
    cdef dict _taken_back
    cdef c_append.Ticket _hold  # the commit ticket the held replies wait for (fsync = always)
    cdef list _held_at
    cdef list _held_tickets
    cdef list _wait_at
    cdef list _wait_tickets
    cdef object _write
    cdef _wire.ReplyWriter _writer  # _write's object, when it is one of erq's writers
    cdef object _close
    cdef object _pause
    cdef bint _paused
    cdef bint _input_held
    cdef public Py_ssize_t out_room
    cdef public bint write_paused
    cdef public bint blocked_on_output
    cdef public bint resumes_next_pass
    cdef public bint input_ended
    cdef public object gone  # a callable: is the client gone (see MemcacheProtocol)

    cpdef hold_back(self, list requests)
    cpdef hold_input(self, bint stop_reading=*)
    cdef _resume_input(self)
    @cython.locals(
        queues=c_queues.QueueCollection, slow_ops=cython.longlong, turn=cython.Py_ssize_t
    )
    cpdef run(self)
    cpdef give_way(self)
    cpdef unblock(self)
    cpdef end_of_input(self)
    cpdef bint waits_for_an_item(self) except -1
    cpdef resume_next_pass(self, object op)
    cdef _close_once_answered(self)
    @cython.locals(ticket=c_append.Ticket)
    cpdef hold_for(self, list tickets, object reply)
    @cython.locals(waiting=list, i=cython.Py_ssize_t, last=cython.Py_ssize_t)
    cdef bint _waits_for(self, object ticket) except -1
    cpdef wait_for_sync(self, object ticket)
    cpdef add_long_reply(self, bytes reply)
    @cython.locals(out=list, data=bytes)
    cpdef flush(self)
    cpdef bint output_full(self) except -1
    cpdef writing_paused(self, bint paused)
    cdef _output_taken(self)
    @cython.locals(
        at=list, tickets=list, held_at=list, held=list, out=list, n=cython.Py_ssize_t,
        end=cython.Py_ssize_t, i=cython.Py_ssize_t,
    )
    cdef bint _send_synced(self) except -1
    @cython.locals(at=list, held=list, i=cython.Py_ssize_t)
    cdef _fail_unsynced(self, list out)
    cpdef close_after(self, object reply)
    cpdef object open_deque(self, object name)
    cdef _compact_lines(self)
    cpdef bint at_open_limit(self, object name, long long limit) except -1
    cpdef bint has_open(self, object name) except -1
    cpdef bint close_oldest(self, object name) except -1
    cpdef bint abort_oldest(self, object name) except -1
    cdef _use_up_taken_back(self, object name)
    cpdef abort_all(self)
