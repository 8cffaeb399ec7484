# cython: language_level=3
cpdef long long now_ms() noexcept
cpdef long long stamp_ms() noexcept
cpdef void begin_pass() noexcept
cpdef void end_pass() noexcept
