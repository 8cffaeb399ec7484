"""Log lines a client can repeat at will (refused connections, binary-protocol requests):
at most one per reason every few seconds, with the count of those left out since, so that a
misbehaving client cannot fill the log."""

from __future__ import annotations

import logging
import time

INTERVAL = 10.0  # seconds between two lines of one reason


class Throttle:
    """One reason's log line: ``log()`` writes it at most once per ``interval`` seconds."""

    __slots__ = ("logger", "level", "interval", "_next", "_skipped")

    def __init__(self, logger: logging.Logger, level: int, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self._next = 0.0  # monotonic time at which the next line may go out
        self._skipped = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self.interval
        if self._skipped:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, self._skipped, self.interval)
            self._skipped = 0
        self.logger.log(self.level, msg, *args)


__all__ = ["INTERVAL", "Throttle"]
