"""The journal's on-disk format: constants shared by the codec twins, recovery and tools.

A queue's journal is a directory of segment files named ``<seq:016x>.seg``. A segment starts
with a 32-byte header, then records, then (in a preallocated segment) zeros:

    header  magic b"ERQJ" | version u16 | flags u16 | seq u64 | id_floor u64 | crc32c u32 | 0 u32
    record  length u32 | crc32c u32 | opcode u8 | body

All integers are little-endian. ``length`` counts opcode + body; the CRC covers the same bytes.
A length of 0 is the end of the data. Header ``flags`` bit 0 (SNAPSHOT) marks a compaction
snapshot: it holds the whole queue state as of its creation, so every segment with a lower
sequence number is superseded. Bit 1 (AFTER_SNAPSHOT) marks the segment a compaction started
for the appends made while it writes its snapshot, numbered one past the snapshot's: if that
compaction never finished (a crash, a failure), the number before this segment's is missing,
and nothing is lost, since the segments the snapshot would have superseded are all still
there. Any other number missing between the segments replay reads is a lost file, and so is
one missing at either end of the range the directory's range file states
(``<first:016x>-<last:016x>.range``, see ``segrange.py``; a directory without one, as erq
wrote them before, is read as it is, so the format version stays 1). ``id_floor`` is greater
than every id in earlier segments, so ids stay monotonic even after every segment that named
them was deleted.

Bodies (after the opcode byte):
    ADD       id u64 | flags u32 | add_time_ms u64 | expiry_ms u64 (0 = none) | data
    REMOVE, OPEN, CONFIRM, UNREMOVE    id u64
    FLUSH     (empty)
"""

from __future__ import annotations

import struct

MAGIC = b"ERQJ"
FORMAT_VERSION = 1
HEADER_SIZE = 32
HEADER_STRUCT = struct.Struct("<4sHHQQ")  # magic, version, flags, seq, id_floor; crc32c follows
HEADER_FLAG_SNAPSHOT = 1
HEADER_FLAG_AFTER_SNAPSHOT = 2
SEGMENT_SUFFIX = ".seg"

OP_ADD = 1
OP_REMOVE = 2
OP_OPEN = 3
OP_CONFIRM = 4
OP_UNREMOVE = 5
OP_FLUSH = 6
OPCODE_NAMES = {
    OP_ADD: "ADD",
    OP_REMOVE: "REMOVE",
    OP_OPEN: "OPEN",
    OP_CONFIRM: "CONFIRM",
    OP_UNREMOVE: "UNREMOVE",
    OP_FLUSH: "FLUSH",
}

RECORD_HEADER_SIZE = 8  # length u32 + crc32c u32
ADD_FIXED_LENGTH = 29  # opcode + id + flags + add_time + expiry: an ADD's length is this + data
ADD_OVERHEAD = RECORD_HEADER_SIZE + ADD_FIXED_LENGTH  # bytes of an ADD record besides its data
OP_RECORD_SIZE = RECORD_HEADER_SIZE + 9  # REMOVE/OPEN/CONFIRM/UNREMOVE
FLUSH_RECORD_SIZE = RECORD_HEADER_SIZE + 1

# What the reader found at a position (RecordIterator.status, check_record).
REC_VALID = 0  # a whole record with a good CRC and a well-formed body
REC_END = 1  # a zero length (or fewer than 4 bytes left, all zero, or the end of the buffer)
REC_TORN = 2  # the record runs past the end of the buffer
REC_BAD = 3  # the record fits but its CRC is wrong or its body is malformed


def segment_name(seq: int) -> str:
    return f"{seq:016x}{SEGMENT_SUFFIX}"


_HEX_DIGITS = frozenset("0123456789abcdef")


def parse_segment_name(name: str) -> int | None:
    """The sequence number of a segment file name (exactly as ``segment_name`` writes it: 16
    lowercase hex digits), or None for any other file. ``int(x, 16)`` alone would take
    ``0x...``, ``_``, spaces and capitals too: two files for one number."""
    stem, dot, suffix = name.partition(".")
    if not dot or "." + suffix != SEGMENT_SUFFIX or len(stem) != 16:
        return None
    if not _HEX_DIGITS.issuperset(stem):
        return None
    return int(stem, 16)
