# cython: language_level=3
cpdef long long now_ms() noexcept
