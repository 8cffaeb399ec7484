"""The queued item: opaque bytes plus the little metadata the protocol and journal need."""

from __future__ import annotations


class Item:
    """One queued value. Times are wall-clock milliseconds; expiry 0 means never."""

    __slots__ = ("id", "data", "flags", "add_time", "expiry")

    def __init__(self, id: int, data: bytes, flags: int, add_time: int, expiry: int) -> None:
        self.id = id
        self.data = data
        self.flags = flags
        self.add_time = add_time
        self.expiry = expiry

    def expired(self, now: int) -> bool:
        return self.expiry != 0 and self.expiry <= now

    def __repr__(self) -> str:
        return f"Item(id={self.id}, flags={self.flags}, len={len(self.data)})"
