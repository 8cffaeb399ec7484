"""The journal's append path: the pure-Python reference.

``erq/_fast/_append.pyx`` is the C optimisation of this module; both export the same names with
the same behaviour (``erq.journal.codec`` picks one). Record layout: see ``format.py``.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from typing import Any

import google_crc32c

from ..journal_api import JournalError
from ._records_py import _REC_HEAD, _add_fixed, _add_record, encode_op
from .format import (
    ADD_FIXED_LENGTH,
    ADD_OVERHEAD,
    HEADER_SIZE,
    OP_CONFIRM,
    OP_OPEN,
    OP_RECORD_SIZE,
    OP_REMOVE,
    OP_UNREMOVE,
)

__all__ = ["PWRITE_THRESHOLD", "AppendCore", "SegmentWriter", "Ticket"]

_log = logging.getLogger("erq.journal")

_TRIM_STEP = 1 << 20  # a trimming writer drops the pages behind it every this many bytes
# A writer given the segment's fd writes an ADD whose data is at least this long with pwritev()
# instead of storing it into the mapping (whose first store into a page costs a page fault);
# the measurements behind the value are in erq/_fast/_append.pyx.
PWRITE_THRESHOLD = 16384


def _write_failed(at: int, err: int, got: int, want: int) -> str:
    """What the journal reports for a record pwritev() could not write (errno ``err``, or a
    short write of ``got`` bytes when it is 0)."""
    if not err:
        why = f"short write ({got} of {want} bytes)"
    elif err in (errno.ENOSPC, errno.EDQUOT):
        why = "disk full"
    else:
        why = os.strerror(err)
    return f"cannot write the record at offset {at} of a segment: {why}"


class SegmentWriter:
    """Appends records to a writable buffer (a segment's mmap) from ``position`` on.

    A record copied into the buffer gets its length field last, so one interrupted half-way
    still reads as the end of the data (length 0 in a zero-filled segment). ``append_*``
    return the record's offset, or -1 when it does not fit in what is left (nothing is
    written then). With ``trim`` (only for a shared file mapping: private memory would lose
    the data) the pages behind the write position are dropped from the process now and then;
    they stay in the page cache and the file.

    ``fd`` (with an mmap ``buffer`` only; -1: none) is the file ``buffer`` maps, shared, from
    offset 0. An ADD whose data is at least PWRITE_THRESHOLD bytes is then written with one
    pwritev() on it, which spares the page faults of first stores into the mapping; the
    bytes are the same and the mapping sees them (one page cache). That write carries the
    length with the rest: a record cut short by a crash fails its CRC instead, which
    recovery treats as it treats a zero length followed by data (a torn record). If the
    write fails (disk full, I/O error, short write) the bytes that landed are zeroed again,
    the writer is unchanged, and JournalError is raised. The writer never closes ``fd``.
    """

    __slots__ = ("_mv", "_pos", "_counts", "_max_id", "_mapping", "_trimmed", "_fd")

    def __init__(
        self, buffer, position: int = HEADER_SIZE, trim: bool = False, fd: int = -1
    ) -> None:
        if fd < -1:
            raise ValueError(f"bad file descriptor {fd}")
        if fd >= 0 and not isinstance(buffer, mmap.mmap):
            raise TypeError("SegmentWriter writes through a file descriptor only for an mmap")
        try:
            mv = memoryview(buffer)
        except TypeError:
            raise TypeError("SegmentWriter needs a writable buffer") from None
        if mv.readonly:
            mv.release()
            raise TypeError("SegmentWriter needs a writable buffer")
        if not 0 <= position <= len(mv):
            size = len(mv)
            mv.release()
            raise ValueError(f"position {position} outside a buffer of {size} bytes")
        self._mv: memoryview | None = mv
        self._pos = position
        self._fd = fd
        # ADD records, their bytes, then REMOVE, OPEN, CONFIRM, UNREMOVE, FLUSH records.
        self._counts = [0, 0, 0, 0, 0, 0, 0]
        self._max_id = 0
        self._mapping = buffer if trim and isinstance(buffer, mmap.mmap) else None
        self._trimmed = position - position % mmap.PAGESIZE

    def _room(self, n: int) -> int:
        """Where a record of ``n`` bytes goes, or -1 if it does not fit."""
        mv = self._mv
        if mv is None:
            raise ValueError("SegmentWriter was released")
        p = self._pos
        return p if n <= len(mv) - p else -1

    def _advance(self, p: int, n: int) -> None:
        self._pos = p + n
        if self._mapping is not None and self._pos - self._trimmed >= _TRIM_STEP:
            upto = self._pos - self._pos % mmap.PAGESIZE
            self._mapping.madvise(mmap.MADV_DONTNEED, self._trimmed, upto - self._trimmed)
            self._trimmed = upto

    def _put(self, record: bytes) -> int:
        n = len(record)
        p = self._room(n)
        if p < 0:
            return -1
        mv = self._mv
        mv[p + 4 : p + n] = record[4:]
        mv[p : p + 4] = record[:4]
        self._advance(p, n)
        return p

    def _pwrite_add(self, fixed: bytes, data, n: int) -> int:
        """The ADD record of ``fixed`` and ``n`` bytes of ``data`` with one pwritev() (see the
        class doc); ``at`` or -1 like _put."""
        if n + ADD_FIXED_LENGTH > 0xFFFFFFFF:
            raise OverflowError("item too large for a journal record")
        size = ADD_OVERHEAD + n
        p = self._room(size)
        if p < 0:
            return -1
        if type(data) is not bytes:
            data = bytes(data)  # google_crc32c takes bytes only
        crc = google_crc32c.extend(google_crc32c.value(fixed), data)
        head = _REC_HEAD.pack(ADD_FIXED_LENGTH + n, crc) + fixed
        try:
            got = os.pwritev(self._fd, [head, data], p)
        except OSError as exc:
            raise JournalError(_write_failed(p, exc.errno, 0, size)) from exc
        if got != size:
            self._mv[p : p + got] = bytes(got)
            raise JournalError(_write_failed(p, 0, got, size))
        self._advance(p, size)
        return p

    def append_add(self, id: int, flags: int, add_time: int, expiry: int, data) -> int:
        fixed = _add_fixed(id, flags, add_time, expiry)
        if self._fd >= 0:
            n = len(data) if type(data) is bytes else memoryview(data).nbytes
            if n >= PWRITE_THRESHOLD:
                at = self._pwrite_add(fixed, data, n)
                if at >= 0:
                    self._count_add(id, ADD_OVERHEAD + n)
                return at
        record = _add_record(fixed, data)
        at = self._put(record)
        if at >= 0:
            self._count_add(id, len(record))
        return at

    def _count_add(self, id: int, size: int) -> None:
        counts = self._counts
        counts[0] += 1
        counts[1] += size
        if id > self._max_id:
            self._max_id = id

    def append_op(self, opcode: int, id: int = 0) -> int:
        at = self._put(encode_op(opcode, id))
        if at >= 0:
            self._counts[opcode] += 1
        return at

    def counters(self) -> tuple[int, int, int, int, int, int, int, int]:
        """What was appended: (ADD records, their bytes, greatest ADD id, REMOVE, OPEN,
        CONFIRM, UNREMOVE, FLUSH records)."""
        c = self._counts
        return (c[0], c[1], self._max_id, c[2], c[3], c[4], c[5], c[6])

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return 0 if self._mv is None else len(self._mv) - self._pos

    def release(self) -> None:
        """Give the buffer back (an mmap cannot close while a writer holds it)."""
        if self._mv is not None:
            self._mv.release()
            self._mv = None
            self._mapping = None
            self._fd = -1


class Ticket:
    """The durability of one journal's appends in one batch (fsync = always; see
    ``erq.journal.commit``).

    ``done`` turns True once the batch's sync ended; ``error`` is then None or the
    JournalError of a failed sync. Until then, ``waiters`` holds callables taken with the
    ticket: they run, in order, when it resolves (check ``done`` before adding one). Here
    with the append path because every append under ``always`` returns one, and the compiled
    session reads its fields in C."""

    __slots__ = ("done", "error", "waiters")

    def __init__(self) -> None:
        self.done = False
        self.error: JournalError | None = None
        self.waiters: list[Callable[[Ticket], object]] = []

    def add_waiter(self, callback: Callable[[Ticket], object]) -> None:
        """Call ``callback(ticket)`` once the ticket resolves (now if it has)."""
        if self.done:
            callback(self)
        else:
            self.waiters.append(callback)

    def resolve(self, error: JournalError | None) -> None:
        """Settle the ticket and call its waiters."""
        self.done = True
        self.error = error
        self.notify()

    def notify(self) -> None:
        """Call the waiters of a settled ticket (once)."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            try:
                waiter(self)
            except Exception:  # one broken waiter must not keep the others' replies back
                _log.exception("a commit ticket's waiter failed")

    def __repr__(self) -> str:
        state = "pending" if not self.done else "failed" if self.error else "synced"
        return f"<Ticket {state}, {len(self.waiters)} waiting>"


class AppendCore:
    """The per-append path of QueueJournal, which subclasses it: write the record into the
    current segment and return None while the record fits and ``_quiet`` holds.

    The subclass provides the slow paths, called only when needed: ``_rotate(record_size)``
    (seal the full segment, return the new writer), ``_written()`` (the fsync policy's
    bookkeeping; returns a ticket or None), and ``_disk`` / ``_segments`` for items kept only
    on disk. ``_writer`` may be any object with SegmentWriter's API (the C one's too).
    """

    __slots__ = ("_writer", "_quiet", "_ticket")

    def __init__(self) -> None:
        # The C class starts out the same (its fields are None and False until assigned).
        self._writer = None
        self._quiet = False
        # fsync = always: the ticket of the batch that has not started yet, which every append
        # joins until it starts (GroupCommit sets and clears it); None otherwise.
        self._ticket = None

    def add(self, id: int, flags: int, add_time: int, expiry: int, data, in_memory=True):
        """Journal a new item at the tail. ``in_memory=False``: the queue keeps it only here,
        to be handed back by ``read_behind``. Returns a ticket (``fsync="always"``) or None;
        raises JournalError when the record cannot be written (disk full)."""
        offset = self._writer.append_add(id, flags, add_time, expiry, data)
        if offset < 0:
            writer = self._rotate(ADD_OVERHEAD + len(data))
            offset = writer.append_add(id, flags, add_time, expiry, data)
        if not in_memory:
            self._disk.push(self._segments[-1], offset, len(data))
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def remove(self, id: int) -> Any:
        """The item left the queue for good (plain get, expiry, discard)."""
        return self._op(OP_REMOVE, id)

    def open(self, id: int) -> Any:
        """The item was handed out as a reliable read."""
        return self._op(OP_OPEN, id)

    def confirm(self, id: int) -> Any:
        """An open read was confirmed: the item is gone for good."""
        return self._op(OP_CONFIRM, id)

    def unremove(self, id: int) -> Any:
        """An open read was aborted: the item is back at the head of the queue."""
        return self._op(OP_UNREMOVE, id)

    def _op(self, opcode: int, id: int) -> Any:
        """Journal a record of ``opcode`` about item ``id``; its ticket (``fsync="always"``)
        or None. Raises JournalError when the record cannot be written."""
        if self._writer.append_op(opcode, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(opcode, id)
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def _append_op(self, opcode: int, id: int) -> None:
        """Write a record of ``opcode`` (FLUSH too), rotating if it does not fit; no fsync
        bookkeeping."""
        if self._writer.append_op(opcode, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(opcode, id)
