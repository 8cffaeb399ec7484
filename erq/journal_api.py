"""The few journal names the upper layers need, importable without the journal package."""


class JournalError(Exception):
    """A write that could not be made durable (disk full, I/O error): never STORED."""


class RecoveryStopped(Exception):
    """Start-up recovery was asked to stop (the server got SIGTERM or SIGINT while replaying);
    the queues opened so far are closed again, and the next start replays them anew."""


class OverLimit(JournalError):
    """A request refused by a limit the server keeps (``max_queues``, the open-file limit),
    not failed by a disk. A JournalError, because it is refused the same way whichever the
    reason: ``SERVER_ERROR <why>``, nothing stored or taken, the connection usable. Logged
    apart from the failures, so that a client past a limit cannot hide a failing disk."""


class TooManyQueues(OverLimit):
    """A new queue refused at ``max_queues``, or where its journal would take the descriptors
    the others need."""
