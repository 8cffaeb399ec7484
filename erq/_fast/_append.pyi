"""The journal's append path (C); same API as erq/journal/_append_py.py."""

from collections.abc import Callable
from typing import Any

from _typeshed import ReadableBuffer, WriteableBuffer

PWRITE_THRESHOLD: int  # an ADD with this much data or more is pwritev()'d (a writer with an fd)

class SegmentWriter:
    def __init__(
        self, buffer: WriteableBuffer, position: int = 32, trim: bool = False, fd: int = -1
    ) -> None: ...
    def append_add(
        self, id: int, flags: int, add_time: int, expiry: int, data: ReadableBuffer
    ) -> int: ...
    def append_op(self, opcode: int, id: int = 0) -> int: ...
    def counters(self) -> tuple[int, int, int, int, int, int, int, int]: ...
    @property
    def position(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    def release(self) -> None: ...

class Ticket:
    """fsync = always: the durability of one journal's appends in one batch."""

    done: bool
    error: Exception | None  # the JournalError of a failed sync
    waiters: list[Callable[[Ticket], object]]
    def add_waiter(self, callback: Callable[[Ticket], object]) -> None: ...
    def resolve(self, error: Exception | None) -> None: ...
    def notify(self) -> None: ...

class AppendCore:
    """QueueJournal's base: the per-append path (the subclass supplies the slow paths)."""

    _writer: Any  # a SegmentWriter of either implementation (None until assigned)
    _quiet: bool
    rotations: int
    _ticket: Ticket | None  # fsync = always: the ticket of the batch to come (set by GroupCommit)
    def add(
        self,
        id: int,
        flags: int,
        add_time: int,
        expiry: int,
        data: ReadableBuffer,
        in_memory: bool = True,
    ) -> Any: ...
    def remove(self, id: int) -> Any: ...
    def open(self, id: int) -> Any: ...
    def confirm(self, id: int) -> Any: ...
    def unremove(self, id: int) -> Any: ...
    def _append_op(self, opcode: int, id: int) -> None: ...
