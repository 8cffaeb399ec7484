"""The few journal names the upper layers need, importable without the journal package."""


class JournalError(Exception):
    """A write that could not be made durable (disk full, I/O error): never STORED."""


class RecoveryStopped(Exception):
    """Start-up recovery was asked to stop (the server got SIGTERM or SIGINT while replaying);
    the queues opened so far are closed again, and the next start replays them anew."""


class TooManyQueues(JournalError):
    """A new queue refused at ``max_queues``. A JournalError, because a request that cannot
    have its queue is refused the same way whichever the reason: ``SERVER_ERROR <why>``,
    nothing stored or taken, the connection usable."""
