"""Pure-Python twin of erq._fast._clock: the wall clock in milliseconds."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch (item add times and expiry are wall-clock ms)."""
    return time.time_ns() // 1_000_000
