"""The fixed replies of the memcache text protocol as erq sends them, and the one a request
gets when its queue's journal fails: shared by every command module."""

from __future__ import annotations

import logging
import re

from erq.journal_api import JournalError, OverLimit
from erq.throttle import Throttle

END = b"END\r\n"
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
DELETED = b"DELETED\r\n"
ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_NAME = b"CLIENT_ERROR bad queue name\r\n"
READ_ONLY = b"SERVER_ERROR read only\r\n"
QUIESCENT = b"SERVER_ERROR quiescent\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"  # max_pending_data: no room
NOT_SUPPORTED = b"CLIENT_ERROR not supported by a queue\r\n"
STARTING = b"SERVER_ERROR starting\r\n"


class _JournalFailedLog:
    """A full disk or a lost journal fails every request that writes: one line per 10 s (for
    all commands together), so that the log does not grow on that full disk at the rate of
    the requests. Refusals at a limit (OverLimit) have their own line, a warning: a client
    past max_queues would otherwise have had a failing disk's lines counted into its own."""

    __slots__ = ("_failed", "_over_limit")

    def __init__(self) -> None:
        logger = logging.getLogger("erq.commands")
        self._failed = Throttle(logger, logging.ERROR)
        self._over_limit = Throttle(logger, logging.WARNING)

    def log(self, msg: str, *args: object) -> None:
        """``args[-1]``: the JournalError."""
        line = self._over_limit if isinstance(args[-1], OverLimit) else self._failed
        line.log(msg, *args)


JOURNAL_FAILED_LOG = _JournalFailedLog()


# A path in a journal error, from its first slash: the client is told the file's name (a queue
# directory or a segment), never where the server keeps its data; the log has it whole.
# A quoted path (an OSError's filename) may hold spaces; an unquoted one ends at the first.
_QUOTED_PATH = re.compile(r"'/(?:[^'/]*/)*")
_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\":/]+/)*")


def journal_failed(exc: JournalError) -> bytes:
    """The reply to a request its queue's journal could not take (disk full, I/O error, out
    of descriptors): nothing was stored or taken, and the connection stays usable."""
    why = _PATH.sub("", _QUOTED_PATH.sub("'", str(exc)))
    return b"SERVER_ERROR " + why.encode("utf-8", "replace")[:200] + b"\r\n"
