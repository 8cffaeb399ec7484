"""Journal records (CRC32C, encoding and checking, reading back): the pure-Python reference.

``erq/_fast/_records.pyx`` is the C optimisation of this module; both export the same names
with the same behaviour (``erq.journal.codec`` picks one). Record layout: see ``format.py``.
The replay state (``_replay_py.py``) and the appender (``_append_py.py``) build on it.

Buffers are anything with the buffer protocol (bytes, bytearray, mmap). Functions that take
``end=-1`` read up to the end of the buffer.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import google_crc32c

if TYPE_CHECKING:
    from array import array

    from _typeshed import ReadableBuffer, WriteableBuffer

from .format import (
    ADD_FIXED_LENGTH,
    ADD_OVERHEAD,
    HEADER_SIZE,
    OP_ADD,
    OP_FLUSH,
    OP_REMOVE,
    OP_UNREMOVE,
    REC_BAD,
    REC_END,
    REC_TORN,
    REC_VALID,
)

__all__ = [
    "CRC32C_IMPLEMENTATION",
    "ItemMaker",
    "RecordIterator",
    "add_data_bytes",
    "check_record",
    "crc32c",
    "encode_add",
    "encode_op",
    "first_nonzero",
    "iter_records",
    "read_add",
    "read_adds",
    "record_offsets",
    "resync",
]

CRC32C_IMPLEMENTATION = f"google-crc32c ({google_crc32c.implementation})"

_U32 = struct.Struct("<I")
_REC_HEAD = struct.Struct("<II")  # length, crc
_ADD_HEAD = struct.Struct("<BQIQQ")  # opcode, id, flags, add_time, expiry
_ADD_BODY = struct.Struct("<QIQQ")  # the same without the opcode, for decoding
_OP_BODY = struct.Struct("<BQ")
_ID = struct.Struct("<Q")
_ZERO_CHUNK = 1 << 20  # first_nonzero reads this much at a time
_OPCODE_BYTE = re.compile(rb"[\x01-\x06]")


def crc32c(data: ReadableBuffer, crc: int = 0) -> int:
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


def _add_record(fixed: bytes, data: ReadableBuffer) -> bytes:
    body = fixed + data
    if len(body) > 0xFFFFFFFF:
        raise OverflowError("item too large for a journal record")
    return _REC_HEAD.pack(len(body), google_crc32c.value(body)) + body


def encode_add(id: int, flags: int, add_time: int, expiry: int, data: ReadableBuffer) -> bytes:
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
    if op != OP_FLUSH and (mv[p + 16] | (mv[p + 28] | mv[p + 36] if op == OP_ADD else 0)) & 0x80:
        return REC_BAD, nxt  # an id or time past 2**63 - 1: erq writes none (a foreign file)
    return REC_VALID, nxt


def check_record(buffer: ReadableBuffer, offset: int, end: int = -1) -> tuple[int, int]:
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


def first_nonzero(buffer: ReadableBuffer, start: int = 0, end: int = -1) -> int:
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


def resync(buffer: ReadableBuffer, start: int, end: int = -1) -> int:
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

    def __init__(
        self, buffer: ReadableBuffer, start: int = HEADER_SIZE, end: int = -1, data: bool = True
    ) -> None:
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


def read_add(buffer: ReadableBuffer, offset: int, cls: type = tuple) -> tuple:
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


class ItemMaker:
    """Makes the items read_adds appends straight from each record: ``make(id, flags,
    add_time, expiry, data)`` (the ring's ITEM_MAKER; the compiled one is a C function)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[int, int, int, int, bytes], object]) -> None:
        self.make = make


def read_adds(
    buffer: ReadableBuffer,
    offsets: array[int],
    start: int,
    max_bytes: int,
    cls: type[tuple] | ItemMaker,
    out: list,
) -> tuple:
    """Append to ``out`` the ADD records at ``offsets[start:]``, in order, each as a ``cls``
    (see read_add) or, with an ItemMaker, as what it makes of (id, flags, add_time, expiry,
    data), while their data fits in ``max_bytes``; if ``out`` is empty the first one is taken
    whatever its size. Returns (index of the first offset not read, data bytes read, True),
    or with False when it stopped at an offset holding no valid ADD record.
    """
    make = cls.make if isinstance(cls, ItemMaker) else None
    if make is None and (
        not isinstance(cls, type) or (cls is not tuple and not _plain_tuple_type(cls))
    ):
        raise TypeError(f"{cls!r} is not a plain tuple subclass or an ItemMaker")
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
            if make is not None:
                out.append(make(*fields))
            else:
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


def record_offsets(buffer: ReadableBuffer, offset: int, out: WriteableBuffer) -> int:
    """Fill ``out`` (64-bit unsigned ints) with the offsets of the records laid end to end
    from ``offset``, each found from the length field of the one before: read-behind's items
    written back to back need no offset of their own. Returns how many were filled. It stops
    after an offset whose record's length cannot be read or runs past the buffer: that one is
    filled, for the reader (which checks each record) to refuse."""
    cap = len(out)
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    unpack = _U32.unpack_from
    filled = 0
    with memoryview(buffer) as mv:
        size = len(mv)
        while filled < cap:
            out[filled] = offset
            filled += 1
            if offset > size - 9:
                break
            offset += 8 + unpack(mv, offset)[0]
            if offset > size:
                break
    return filled


def add_data_bytes(
    buffer: ReadableBuffer, offsets: array[int], start: int = 0, end: int = -1
) -> int:
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
