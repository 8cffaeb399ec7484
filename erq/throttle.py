"""Log lines a client can repeat at will (refused connections, binary-protocol requests):
at most one per reason every few seconds, with the count of those left out since, so that a
misbehaving client cannot fill the log."""

from __future__ import annotations

import logging
import time

INTERVAL = 10.0  # seconds between two lines of one reason


class Throttle:
    """One reason's log line: ``log()`` writes it at most once per ``interval`` seconds."""

    __slots__ = ("logger", "level", "interval", "_last", "_skipped")

    def __init__(self, logger: logging.Logger, level: int, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self._last: float | None = None  # monotonic time of the last line written
        self._skipped = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last
        if last is not None and now < last + self.interval:
            self._skipped += 1
            return
        self._last = now
        if self._skipped:
            # Left out since the last line, which may be long before the interval's start.
            msg += " (and %d more like it since the last such line, %.0f s ago)"
            args = (*args, self._skipped, now - last)
            self._skipped = 0
        self.logger.log(self.level, msg, *args)


__all__ = ["INTERVAL", "Throttle"]
