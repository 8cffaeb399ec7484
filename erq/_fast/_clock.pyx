# cython: language_level=3
"""The wall clock in milliseconds as a C call (twin: erq/_clock_py.py; selector: erq.clock).

Every set stamps its item and every get checks expiry against this clock. Through
``time.time_ns`` that is a global lookup, a Python call and two integer objects per request;
the compiled queue modules cimport this function and call ``clock_gettime`` directly.

``stamp_ms`` is the clock the queues stamp and check items with. Within a pass of erq's
connection layer (``erq/_fast/_epoll.pyx``, between ``begin_pass`` and ``end_pass``) it reads
the clock once per STAMP_REUSES calls and hands the same millisecond to the requests between:
on this kind of virtual machine a ``clock_gettime`` costs ~30-60 ns, about 1% of a request
at 50 connections. An item's times are then at most that many requests' work behind the
wall clock (microseconds; a millisecond or two for a run of 64 KiB sets), as if those
requests had come that much earlier. Blocked gets' deadlines do not use it.
"""

from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

# How many stamps within a pass share one reading of the clock.
cdef enum:
    STAMP_REUSES = 32

cdef bint _in_pass = False
cdef int _uses = 0  # stamps handed out since the last reading, within this pass
cdef long long _stamp = 0


cpdef long long now_ms() noexcept:
    """Milliseconds since the epoch: ``time.time_ns() // 1_000_000``."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cpdef long long stamp_ms() noexcept:
    """``now_ms``, read afresh outside a pass and once per STAMP_REUSES calls within one."""
    global _uses, _stamp
    if not _in_pass:
        return now_ms()
    if _uses == 0:
        _stamp = now_ms()
    _uses += 1
    if _uses == STAMP_REUSES:
        _uses = 0
    return _stamp


cpdef void begin_pass() noexcept:
    """The connection layer starts serving the sockets epoll found ready."""
    global _in_pass, _uses
    _in_pass = True
    _uses = 0


cpdef void end_pass() noexcept:
    global _in_pass
    _in_pass = False
