"""Journal codec selector: the Cython modules when built and allowed, else the pure twins.

Three modules, each with its twin: the records (``_records``: CRC, encode, check, read), the
replay state (``_replay``) and the append path (``_append``, with the group commit's ``Ticket``).
"""

import importlib
from types import SimpleNamespace

from .._compat import USE_EXTENSIONS

MODULES = ("_records", "_replay", "_append")  # erq._fast.<name>, twin erq.journal.<name>_py

if USE_EXTENSIONS:
    from .._fast._append import PWRITE_THRESHOLD, AppendCore, SegmentWriter, Ticket
    from .._fast._records import (
        CRC32C_IMPLEMENTATION,
        ItemMaker,
        RecordIterator,
        add_data_bytes,
        check_record,
        crc32c,
        encode_add,
        encode_op,
        first_nonzero,
        iter_records,
        read_add,
        read_adds,
        record_offsets,
        resync,
    )
    from .._fast._replay import ReplayTail, replay_records
else:
    from ._append_py import PWRITE_THRESHOLD, AppendCore, SegmentWriter, Ticket
    from ._records_py import (
        CRC32C_IMPLEMENTATION,
        ItemMaker,
        RecordIterator,
        add_data_bytes,
        check_record,
        crc32c,
        encode_add,
        encode_op,
        first_nonzero,
        iter_records,
        read_add,
        read_adds,
        record_offsets,
        resync,
    )
    from ._replay_py import ReplayTail, replay_records


def implementation(fast: bool) -> SimpleNamespace:
    """Every name of one implementation, C (``fast``) or pure, whichever the selector chose:
    for the tests and benchmarks that run or compare both."""
    names: dict = {}
    for name in MODULES:
        path = f"erq._fast.{name}" if fast else f"erq.journal.{name}_py"
        names.update(vars(importlib.import_module(path)))
    public = {k: v for k, v in names.items() if not k.startswith("__")}
    return SimpleNamespace(__name__=f"journal codec ({'C' if fast else 'pure'})", **public)


__all__ = [
    "CRC32C_IMPLEMENTATION",
    "PWRITE_THRESHOLD",
    "AppendCore",
    "ItemMaker",
    "RecordIterator",
    "ReplayTail",
    "SegmentWriter",
    "Ticket",
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
    "replay_records",
    "resync",
]
