# cython: language_level=3
"""The wall clock in milliseconds as a C call (twin: erq/_clock_py.py; selector: erq.clock).

Every set stamps its item and every get checks expiry against this clock. Through
``time.time_ns`` that is a global lookup, a Python call and two integer objects per request;
the compiled queue modules cimport this function and call ``clock_gettime`` directly.
"""

from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec


cpdef long long now_ms() noexcept:
    """Milliseconds since the epoch: ``time.time_ns() // 1_000_000``."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
