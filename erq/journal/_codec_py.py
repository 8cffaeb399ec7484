"""Journal record codec and segment appender: the pure-Python reference.

``erq/_fast/_journal.pyx`` is the C optimisation of this module; both export the same names
with the same behaviour (``erq.journal.codec`` picks one). Record layout: see ``format.py``.

Buffers are anything with the buffer protocol (bytes, bytearray, mmap). Functions that take
``end=-1`` read up to the end of the buffer.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from array import array
from bisect import bisect_left
from itertools import compress, count, islice, repeat
from operator import ge, ne

import google_crc32c

from ..journal_api import JournalError
from .format import (
    ADD_FIXED_LENGTH,
    ADD_OVERHEAD,
    HEADER_SIZE,
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_RECORD_SIZE,
    OP_REMOVE,
    OP_UNREMOVE,
    REC_BAD,
    REC_END,
    REC_TORN,
    REC_VALID,
)

__all__ = [
    "CRC32C_IMPLEMENTATION",
    "AppendCore",
    "RecordIterator",
    "ReplayTail",
    "SegmentWriter",
    "add_data_bytes",
    "check_record",
    "crc32c",
    "encode_add",
    "encode_op",
    "first_nonzero",
    "iter_records",
    "read_add",
    "read_adds",
    "replay_records",
    "resync",
]

CRC32C_IMPLEMENTATION = f"google-crc32c ({google_crc32c.implementation})"

_U32 = struct.Struct("<I")
_REC_HEAD = struct.Struct("<II")  # length, crc
_ADD_HEAD = struct.Struct("<BQIQQ")  # opcode, id, flags, add_time, expiry
_ADD_BODY = struct.Struct("<QIQQ")  # the same without the opcode, for decoding
_OP_BODY = struct.Struct("<BQ")
_ID = struct.Struct("<Q")
_ZERO_CHUNK = 1 << 20
_TRIM_STEP = 1 << 20  # a trimming writer drops the pages behind it every this many bytes
# A writer given the segment's fd writes an ADD whose data is at least this long with pwritev()
# instead of storing it into the mapping (whose first store into a page costs a page fault);
# the measurements behind the value are in erq/_fast/_journal.pyx.
PWRITE_THRESHOLD = 16384
_OPCODE_BYTE = re.compile(rb"[\x01-\x06]")


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (the result for the bytes before it)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if not 0 <= crc <= 0xFFFFFFFF:
        raise OverflowError("crc must be a u32")
    return google_crc32c.extend(crc, data)


def _range_error(values: tuple) -> Exception:
    if not all(isinstance(v, int) for v in values):
        return TypeError("an integer is required")
    return OverflowError("value out of range for the record field")


def _add_fixed(id: int, flags: int, add_time: int, expiry: int) -> bytes:
    """The opcode and fixed fields of an ADD record (after length and CRC)."""
    try:
        return _ADD_HEAD.pack(OP_ADD, id, flags, add_time, expiry)
    except struct.error:
        raise _range_error((id, flags, add_time, expiry)) from None


def _add_record(fixed: bytes, data) -> bytes:
    body = fixed + data
    if len(body) > 0xFFFFFFFF:
        raise OverflowError("item too large for a journal record")
    return _REC_HEAD.pack(len(body), google_crc32c.value(body)) + body


def encode_add(id: int, flags: int, add_time: int, expiry: int, data) -> bytes:
    """A complete ADD record."""
    return _add_record(_add_fixed(id, flags, add_time, expiry), data)


def encode_op(opcode: int, id: int = 0) -> bytes:
    """A complete REMOVE/OPEN/CONFIRM/UNREMOVE(id) or FLUSH record (FLUSH ignores ``id``)."""
    if opcode == OP_FLUSH:
        body = b"\x06"
    elif OP_REMOVE <= opcode <= OP_UNREMOVE:
        try:
            body = _OP_BODY.pack(opcode, id)
        except struct.error:
            raise _range_error((id,)) from None
    else:
        raise ValueError(f"not an id opcode: {opcode}")
    return _REC_HEAD.pack(len(body), google_crc32c.value(body)) + body


def _bounds(mv: memoryview, start: int, end: int) -> int:
    size = len(mv)
    if end < 0:
        end = size
    if end > size or start < 0 or start > end:
        raise ValueError(f"bad range [{start}, {end}) for a buffer of {size} bytes")
    return end


def _check(mv: memoryview, p: int, end: int) -> tuple[int, int]:
    """(status, next offset) of the record at ``p``; next is ``p`` unless the record fits."""
    left = end - p
    if left < 4:
        return (REC_END if not any(mv[p:end]) else REC_TORN), p
    length = _U32.unpack_from(mv, p)[0]
    if length == 0:
        return REC_END, p
    if left < 8 or length > left - 8:
        return REC_TORN, p
    nxt = p + 8 + length
    op = mv[p + 8]
    if op == OP_ADD:
        shaped = length >= ADD_FIXED_LENGTH
    elif OP_REMOVE <= op <= OP_UNREMOVE:
        shaped = length == 9
    else:
        shaped = op == OP_FLUSH and length == 1
    if not shaped:
        return REC_BAD, nxt
    if google_crc32c.value(bytes(mv[p + 8 : nxt])) != _U32.unpack_from(mv, p + 4)[0]:
        return REC_BAD, nxt
    return REC_VALID, nxt


def check_record(buffer, offset: int, end: int = -1) -> tuple[int, int]:
    """What lies at ``offset``: (REC_* status, offset after the record or ``offset``)."""
    with memoryview(buffer) as mv:
        end = _bounds(mv, offset, end)
        return _check(mv, offset, end)


def _first_nonzero(mv: memoryview, start: int, end: int) -> int:
    p = start
    while p < end:
        chunk = bytes(mv[p : min(end, p + _ZERO_CHUNK)])
        rest = chunk.lstrip(b"\x00")
        if rest:
            return p + len(chunk) - len(rest)
        p += len(chunk)
    return -1


def first_nonzero(buffer, start: int = 0, end: int = -1) -> int:
    """Offset of the first non-zero byte in [start, end), or -1."""
    with memoryview(buffer) as mv:
        end = _bounds(mv, start, end)
        return _first_nonzero(mv, start, end)


def _accept(mv: memoryview, q: int, end: int) -> bool:
    """A resync point: a valid record followed by another or by a clean end."""
    status, nxt = _check(mv, q, end)
    if status != REC_VALID:
        return False
    status, _ = _check(mv, nxt, end)
    return status == REC_VALID or (status == REC_END and _first_nonzero(mv, nxt, end) < 0)


def resync(buffer, start: int, end: int = -1) -> int:
    """After a failure at ``start``, where records resume, or -1 (nothing valid follows).

    That is the first offset after ``start`` holding a valid record followed by another valid
    record or by a clean end (only zeros): one stray match inside item data is not enough.
    """
    with memoryview(buffer) as mv:
        end = _bounds(mv, start, end)
        # A record at q has its opcode (1..6) at q + 8: only those offsets are candidates.
        for match in _OPCODE_BYTE.finditer(mv, start + 9, end):
            q = match.start() - 8
            if _accept(mv, q, end):
                return q
        return -1


def _decode(mv: memoryview, p: int, nxt: int, want_data: bool) -> tuple:
    op = mv[p + 8]
    if op == OP_ADD:
        id, flags, add_time, expiry = _ADD_BODY.unpack_from(mv, p + 9)
        data = bytes(mv[p + ADD_OVERHEAD : nxt]) if want_data else None
        return (p, op, id, flags, add_time, expiry, data)
    if op == OP_FLUSH:
        return (p, op, 0, 0, 0, 0, None)
    return (p, op, _ID.unpack_from(mv, p + 9)[0], 0, 0, 0, None)


class RecordIterator:
    """Yields (offset, opcode, id, flags, add_time, expiry, data) for each valid record.

    ``data`` is the ADD's bytes (None for other opcodes, or for every record when made with
    ``data=False``). Iteration stops at the first position that is not a valid record;
    ``status`` then says why (REC_END, REC_TORN or REC_BAD; REC_VALID while running) and
    ``position`` is that offset. The buffer is released when iteration stops.
    """

    __slots__ = ("_mv", "_pos", "_end", "_data", "status")

    def __init__(self, buffer, start: int = HEADER_SIZE, end: int = -1, data: bool = True) -> None:
        mv = memoryview(buffer)
        try:
            self._end = _bounds(mv, start, end)
        except ValueError:
            mv.release()
            raise
        self._mv: memoryview | None = mv
        self._pos = start
        self._data = bool(data)
        self.status = REC_VALID

    def __iter__(self) -> RecordIterator:
        return self

    def __next__(self) -> tuple:
        mv = self._mv
        if mv is None:
            raise StopIteration
        p = self._pos
        status, nxt = _check(mv, p, self._end)
        if status != REC_VALID:
            self.status = status
            self.release()
            raise StopIteration
        self._pos = nxt
        return _decode(mv, p, nxt, self._data)

    @property
    def position(self) -> int:
        """Offset of the next record to read (where iteration stopped, once it has)."""
        return self._pos

    def release(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = None


def iter_records(
    buffer, start: int = HEADER_SIZE, end: int = -1, data: bool = True
) -> RecordIterator:
    """Iterate the records of ``buffer`` from ``start``; see :class:`RecordIterator`."""
    return RecordIterator(buffer, start, end, data)


def read_add(buffer, offset: int, cls: type = tuple) -> tuple:
    """The ADD record at ``offset`` as a ``cls`` of (id, flags, add_time, expiry, data).

    ``cls`` is ``tuple`` or a tuple subclass without instance state (a NamedTuple such as
    RecoveredItem). Raises ValueError if there is no valid ADD record there (CRC checked).
    """
    if cls is not tuple and not _plain_tuple_type(cls):
        raise TypeError(f"{cls.__name__} is not a plain tuple subclass")
    with memoryview(buffer) as mv:
        end = _bounds(mv, offset, -1)
        status, nxt = _check(mv, offset, end)
        if status != REC_VALID or mv[offset + 8] != OP_ADD:
            raise ValueError(f"no valid ADD record at offset {offset}")
        fields = _decode(mv, offset, nxt, True)[2:]
    return fields if cls is tuple else tuple.__new__(cls, fields)


def read_adds(buffer, offsets, start: int, max_bytes: int, cls: type, out: list) -> tuple:
    """Append to ``out`` the ADD records at ``offsets[start:]``, in order, each as a ``cls``
    (see read_add), while their data fits in ``max_bytes``; if ``out`` is empty the first
    one is taken whatever its size. Returns (index of the first offset not read, data bytes
    read, True), or with False when it stopped at an offset holding no valid ADD record.
    """
    if cls is not tuple and not _plain_tuple_type(cls):
        raise TypeError(f"{cls.__name__} is not a plain tuple subclass")
    n = len(offsets)
    if not 0 <= start <= n:
        raise ValueError(f"start {start} outside {n} offsets")
    got = 0
    i = start
    with memoryview(buffer) as mv:
        end = len(mv)
        while i < n:
            offset = offsets[i]
            if offset >= end:
                return i, got, False
            status, nxt = _check(mv, offset, end)
            if status != REC_VALID or mv[offset + 8] != OP_ADD:
                return i, got, False
            size = nxt - offset - ADD_OVERHEAD
            if got + size > max_bytes and (got or out):
                break
            fields = _decode(mv, offset, nxt, True)[2:]
            out.append(fields if cls is tuple else tuple.__new__(cls, fields))
            got += size
            i += 1
    return i, got, True


def _plain_tuple_type(cls: type) -> bool:
    return (
        issubclass(cls, tuple)
        and cls.__basicsize__ == tuple.__basicsize__
        and cls.__itemsize__ == tuple.__itemsize__
        and not cls.__dictoffset__
    )


def add_data_bytes(buffer, offsets, start: int = 0, end: int = -1) -> int:
    """The data bytes of the ADD records at ``offsets[start:end]`` (``end=-1``: to the end),
    from their length fields. Raises ValueError at an offset holding no ADD record there (its
    length, opcode and extent are checked, not its CRC: recovery's replay checked that)."""
    n = len(offsets)
    if end < 0:
        end = n
    if not 0 <= start <= end <= n:
        raise ValueError(f"bad range [{start}, {end}) of {n} offsets")
    total = 0
    unpack = _U32.unpack_from
    with memoryview(buffer) as mv:
        size = len(mv)
        for i in range(start, end):
            offset = offsets[i]
            if offset > size - 9:
                raise ValueError(f"no ADD record at offset {offset}")
            length = unpack(mv, offset)[0]
            if mv[offset + 8] != OP_ADD or not ADD_FIXED_LENGTH <= length <= size - offset - 8:
                raise ValueError(f"no ADD record at offset {offset}")
            total += length - ADD_FIXED_LENGTH
    return total


_TOMBSTONE = (1 << 64) - 1  # the position of a removed entry: no record is ever there
_U64_LIMIT = 1 << 64


class ReplayTail:
    """Recovery's queued ids in ADD order, each with the position of its ADD record: the
    replay state of a queue's tail in two arrays of unsigned 64-bit ints (16 bytes per entry)
    instead of a dict of Python ints (about 110).

    ``add`` appends an id that is not queued; ``pop`` removes one wherever it is and returns
    its position (None if it is not queued); ``in`` and ``len`` see the queued ids; iteration
    gives them in ADD order, ``items()`` with their positions; ``take_positions()`` hands the
    positions over (an ``array('Q')``, not copied) and empties the tail; ``clear()`` is FLUSH.

    A removed entry becomes a tombstone (position 2**64 - 1); ``_cursor`` is the first live
    entry, so removing the oldest (the FIFO common case) costs O(1). Another id is found by
    bisection in the runs of strictly increasing ids (one run for a journal written by one
    server, a few after a compaction snapshot that wrote the queue in its own order); past
    RUN_LIMIT runs a dict id -> index is built and kept up to date instead. An add first
    compacts the arrays when the tombstones number at least COMPACT_MIN and outnumber the
    live entries, so the arrays stay within about twice the live entries however often the
    queue drains and refills; when the last live entry goes the tail starts afresh.
    ``slots`` (entries held, tombstones included) and ``indexed`` show that bookkeeping.
    The C twin follows the same rules, so both report the same ``slots`` and ``indexed``.
    """

    __slots__ = ("_ids", "_positions", "_cursor", "_live", "_runs", "_index")

    RUN_LIMIT = 32
    COMPACT_MIN = 1024

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._ids = array("Q")  # ids in ADD order, removed ones too
        self._positions = array("Q")  # their ADD positions; _TOMBSTONE once removed
        self._cursor = 0  # the first live entry (len(_ids) when there is none)
        self._live = 0
        self._runs: list[int] = []  # starts of the strictly increasing runs; the first <= _cursor
        self._index: dict[int, int] | None = None  # id -> index of the live ids, past RUN_LIMIT

    def __len__(self) -> int:
        return self._live

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int) and 0 <= id < _U64_LIMIT and self._find(id) >= 0

    def __iter__(self):
        ids, positions = self._ids, self._positions
        for i in range(self._cursor, len(ids)):
            if positions[i] != _TOMBSTONE:
                yield ids[i]

    def items(self):
        """(id, position) of the queued ids, in ADD order."""
        ids, positions = self._ids, self._positions
        for i in range(self._cursor, len(ids)):
            if positions[i] != _TOMBSTONE:
                yield ids[i], positions[i]

    @property
    def slots(self) -> int:
        """Entries held in the arrays: the queued ids and the tombstones not compacted yet."""
        return len(self._ids)

    @property
    def indexed(self) -> bool:
        """Whether ids are looked up in a dict (too many runs for bisection)."""
        return self._index is not None

    def add(self, id: int, position: int) -> None:
        """Queue ``id`` (not queued already: ValueError) with its ADD ``position``."""
        if not isinstance(id, int) or not isinstance(position, int):
            raise TypeError("an integer is required")
        if not 0 <= id < _U64_LIMIT or not 0 <= position < _U64_LIMIT:
            raise OverflowError("value out of range for an unsigned 64-bit int")
        if position == _TOMBSTONE:
            raise ValueError("position 2**64 - 1 marks a removed entry")
        if self._find(id) >= 0:
            raise ValueError(f"id {id} is already queued")
        self._append(id, position)

    def pop(self, id: int) -> int | None:
        """Remove ``id``; its position, or None if it was not queued."""
        if not isinstance(id, int) or not 0 <= id < _U64_LIMIT:
            return None
        i = self._find(id)
        return None if i < 0 else self._pop_at(i, id)

    def clear(self) -> None:
        self._reset()

    def take_positions(self) -> array:
        """The positions of the queued ids in ADD order, as an ``array('Q')``; the tail is
        left empty (its storage is handed over, not copied)."""
        self._squeeze()
        out = self._positions
        self._reset()
        return out

    # ---- internals (replay_records calls _find, _append and _pop_at) ----------------------
    def _find(self, id: int) -> int:
        """Index of the live entry of ``id``, or -1."""
        if not self._live:
            return -1
        if self._index is not None:
            return self._index.get(id, -1)
        ids = self._ids
        cursor = self._cursor
        if ids[cursor] == id:
            return cursor
        runs = self._runs
        last = len(runs) - 1
        for k, start in enumerate(runs):
            end = runs[k + 1] if k < last else len(ids)
            if end <= cursor:
                continue
            lo = start if start > cursor else cursor
            if id < ids[lo] or id > ids[end - 1]:
                continue
            i = bisect_left(ids, id, lo, end)
            if ids[i] == id and self._positions[i] != _TOMBSTONE:
                return i
        return -1

    def _append(self, id: int, position: int) -> None:
        """Add an entry for ``id``, which the caller knows is not queued."""
        n = len(self._ids)
        dead = n - self._live
        if dead >= self.COMPACT_MIN and dead > self._live:
            self._compact()
            n = len(self._ids)
        ids = self._ids
        if not n:
            self._runs = [0]
        elif self._index is None and id <= ids[n - 1]:
            self._new_run(n)
        ids.append(id)
        self._positions.append(position)
        self._live += 1
        if self._index is not None:
            self._index[id] = n

    def _new_run(self, start: int) -> None:
        runs, cursor = self._runs, self._cursor
        k = 0
        while k + 1 < len(runs) and runs[k + 1] <= cursor:  # runs wholly removed
            k += 1
        del runs[:k]
        if len(runs) < self.RUN_LIMIT:
            runs.append(start)
        else:
            self._build_index()

    def _build_index(self) -> None:
        ids, positions = self._ids, self._positions
        self._index = {
            ids[i]: i for i in range(self._cursor, len(ids)) if positions[i] != _TOMBSTONE
        }
        self._runs = []

    def _pop_at(self, i: int, id: int) -> int:
        positions = self._positions
        position = positions[i]
        positions[i] = _TOMBSTONE
        self._live -= 1
        if not self._live:
            self._reset()
            return position
        if self._index is not None:
            del self._index[id]
        if i == self._cursor:
            i += 1
            while positions[i] == _TOMBSTONE:  # a live entry follows: _live > 0
                i += 1
            self._cursor = i
        return position

    def _squeeze(self) -> None:
        """Move the live entries to the front, in order, dropping every tombstone."""
        ids, positions, cursor = self._ids, self._positions, self._cursor
        if len(ids) - cursor == self._live:  # no tombstone after the cursor
            del ids[:cursor]
            del positions[:cursor]
        else:
            keep = list(map(ne, islice(positions, cursor, None), repeat(_TOMBSTONE)))
            self._ids = array("Q", compress(islice(ids, cursor, None), keep))
            self._positions = array("Q", compress(islice(positions, cursor, None), keep))
        self._cursor = 0

    def _compact(self) -> None:
        self._squeeze()
        ids = self._ids
        # Where ids[i] <= ids[i - 1] a run starts: at most RUN_LIMIT runs, or the index.
        breaks = list(
            islice(compress(count(1), map(ge, ids, islice(ids, 1, None))), self.RUN_LIMIT)
        )
        if len(breaks) < self.RUN_LIMIT:
            self._runs = [0, *breaks]
            self._index = None
        else:
            self._build_index()


def replay_records(
    buffer,
    start: int,
    end: int,
    base: int,
    tail: ReplayTail,
    head: dict,
    opened: dict,
    max_id: int,
    duplicates: list,
) -> tuple[int, int, int]:
    """Apply the valid records from ``start`` to recovery's replay state; stop at the first
    position that is not a valid record. Returns (status, that position, greatest id seen).

    ``tail`` (this module's ReplayTail) holds the queued ids in ADD order with ``base +
    offset`` of their ADD; ``head`` maps the ids put back by UNREMOVE to theirs (the queue
    order is its reverse insertion order); ``opened`` the open reads, in OPEN order. An ADD
    of an id already live is not applied; its offset goes to ``duplicates``. Ids never seen
    are ignored.
    """
    if not isinstance(tail, ReplayTail):
        raise TypeError(f"tail must be a ReplayTail, not {type(tail).__name__}")
    find, pop_at = tail._find, tail._pop_at
    records = RecordIterator(buffer, start, end, False)
    for pos, op, id, _, _, _, _ in records:
        if op == OP_FLUSH:
            tail.clear()
            head.clear()
            continue
        if op == OP_ADD:
            if id <= max_id and (find(id) >= 0 or id in head or id in opened):
                duplicates.append(pos)
            else:
                tail._append(id, base + pos)
        elif op == OP_REMOVE:
            i = find(id)
            if i >= 0:
                pop_at(i, id)
            elif head.pop(id, None) is None:
                opened.pop(id, None)
        elif op == OP_OPEN:
            i = find(id)
            value = pop_at(i, id) if i >= 0 else head.pop(id, None)
            if value is not None:
                opened[id] = value
        elif op == OP_CONFIRM:
            opened.pop(id, None)
        else:  # OP_UNREMOVE
            value = opened.pop(id, None)
            if value is not None:
                head[id] = value
        if id > max_id:
            max_id = id
    return records.status, records.position, max_id


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
            mv.release()
            raise ValueError(f"position {position} outside a buffer of {len(mv)} bytes")
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

    def remove(self, id: int):
        """The item left the queue for good (plain get, expiry, discard)."""
        if self._writer.append_op(OP_REMOVE, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(OP_REMOVE, id)
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def open(self, id: int):
        """The item was handed out as a reliable read."""
        if self._writer.append_op(OP_OPEN, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(OP_OPEN, id)
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def confirm(self, id: int):
        """An open read was confirmed: the item is gone for good."""
        if self._writer.append_op(OP_CONFIRM, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(OP_CONFIRM, id)
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def unremove(self, id: int):
        """An open read was aborted: the item is back at the head of the queue."""
        if self._writer.append_op(OP_UNREMOVE, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(OP_UNREMOVE, id)
        if self._quiet:
            return None
        ticket = self._ticket  # the batch to come covers this append too
        return ticket if ticket is not None else self._written()

    def _append_op(self, opcode: int, id: int) -> None:
        """Write a record of ``opcode`` (FLUSH too), rotating if it does not fit; no fsync
        bookkeeping."""
        if self._writer.append_op(opcode, id) < 0:
            self._rotate(OP_RECORD_SIZE).append_op(opcode, id)
