"""The queue-name rule (PROTOCOL.md §1), in one place for the server and the client.

Plain Python with no imports, so that ``erq.client`` can check a name before any I/O without
loading the server's queue layer.
"""

from __future__ import annotations

_NAME_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in b"/.~")


def valid_queue_name(name: bytes) -> bool:
    """PROTOCOL §1: 1-250 printable ASCII bytes, no space '/', '.', '~'; '+' once, inside."""
    if not 0 < len(name) <= 250 or name.translate(None, _NAME_BYTES):
        return False
    plus = name.count(b"+")
    return plus == 0 or (plus == 1 and name[0] != 0x2B and name[-1] != 0x2B)


__all__ = ["valid_queue_name"]
