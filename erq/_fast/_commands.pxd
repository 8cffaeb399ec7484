# C types for the compiled build of erq/_commands_py.py (linked here as _commands.py; see its
# docstring). The Python source is the behaviour; this file turns the per-request functions
# into C calls and the session into a struct (cimported as a module: the source imports the
# name Session from the selector).
cimport cython

cimport erq._fast._keys as _keys
cimport erq._fast._keys as c_keys
cimport erq._fast._queue as _queue
cimport erq._fast._queue as c_queue
cimport erq._fast._queues as c_queues
cimport erq._fast._ring as c_ring
cimport erq._fast._session as c_session
cimport erq._fast._state as c_state
cimport erq._fast._wire as _wire

cdef Py_ssize_t _requests_per_pass
cdef Py_ssize_t _reused_key_max
cdef Py_ssize_t _send_every


@cython.locals(state=c_state.ServerState, queues=c_queues.QueueCollection, queue=c_queue.Queue)
cpdef cmd_set(c_session.Session session, tuple req)


cdef class GetOperation


@cython.locals(
    state=c_state.ServerState,
    counters=c_state.Counters,
    queue=c_queue.Queue,
    spec=c_keys.KeySpec,
    ended=cython.bint,
)
cpdef bint run_keys(
    c_session.Session session, tuple specs, bint gets, Py_ssize_t index, GetOperation op
) except -1
@cython.locals(counters=c_state.Counters)
cpdef bint answer_key(
    c_session.Session session, c_keys.KeySpec spec, c_queue.Queue queue, c_ring.Item item,
    bint gets, bint last=*
) except -1


cdef class GetOperation:
    cdef public c_session.Session session
    cdef public tuple specs
    cdef public Py_ssize_t index
    cdef public bint gets
    cdef public object waiter
    cdef public long long deadline
    cdef public bint refetch

    cpdef bint run(self) except -1
    @cython.locals(waiter=KeyWaiter)
    cdef _wait(self, c_queue.Queue queue, c_keys.KeySpec spec)
    cpdef resumed(self, c_keys.KeySpec spec, c_queue.Queue queue, c_ring.Item item)
    cdef _forget_deadline(self)


cdef class KeyWaiter(_queue.Waiter):
    cdef public GetOperation op
    cdef public c_queue.Queue queue
    cdef public c_keys.KeySpec spec

    cpdef wake(self, c_ring.Item item)
    cpdef bint gone(self) except -1


@cython.locals(cas=cython.longlong)
cpdef value_block(
    c_session.Session session, bytes prefix, bytes kestrel_prefix, c_ring.Item item, bint gets,
    bint end=*
)
@cython.locals(keys=tuple, key=object)
cpdef cmd_get(c_session.Session session, tuple req)
@cython.locals(
    i=cython.Py_ssize_t,
    count=cython.Py_ssize_t,
    turn=cython.Py_ssize_t,
    queues=c_queues.QueueCollection,
    slow_ops=cython.longlong,
)
@cython.locals(writer=_wire.ReplyWriter, send_at=Py_ssize_t)
cpdef feed(c_session.Session session, list requests)
cpdef dispatch(c_session.Session session, tuple req)
