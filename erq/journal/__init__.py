"""erq's per-queue durable journal: segment files of CRC'd records, replay, compaction.

The journal knows nothing of sockets or the protocol; a queue drives it through
:class:`QueueJournal` and the server shares one :class:`GroupCommit` for fsyncs.
"""

from ..journal_api import JournalError
from .codec import CRC32C_IMPLEMENTATION, Ticket
from .commit import GroupCommit
from .journal import GiB, MiB, QueueJournal
from .recovery import RecoveredItem, Recovery

__all__ = [
    "CRC32C_IMPLEMENTATION",
    "GiB",
    "GroupCommit",
    "JournalError",
    "MiB",
    "QueueJournal",
    "RecoveredItem",
    "Recovery",
    "Ticket",
]
