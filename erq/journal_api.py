"""The few journal names the upper layers need, importable without the journal package."""


class JournalError(Exception):
    """A write that could not be made durable (disk full, I/O error): never STORED."""
