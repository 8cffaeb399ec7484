"""Journal codec selector: the Cython module when built and allowed, else the pure twin."""

from .._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from .._fast._journal import (
        CRC32C_IMPLEMENTATION,
        AppendCore,
        RecordIterator,
        ReplayTail,
        SegmentWriter,
        add_data_bytes,
        check_record,
        crc32c,
        encode_add,
        encode_op,
        first_nonzero,
        iter_records,
        read_add,
        read_adds,
        replay_records,
        resync,
    )
else:
    from ._codec_py import (
        CRC32C_IMPLEMENTATION,
        AppendCore,
        RecordIterator,
        ReplayTail,
        SegmentWriter,
        add_data_bytes,
        check_record,
        crc32c,
        encode_add,
        encode_op,
        first_nonzero,
        iter_records,
        read_add,
        read_adds,
        replay_records,
        resync,
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
