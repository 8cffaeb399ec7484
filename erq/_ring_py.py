"""Pure-Python twin of erq._fast._ring: a growable FIFO ring of Python objects.

The reference behaviour for the Cython ring. It is written as an explicit ring (list +
head index + count) rather than a deque so that the two implementations share one
algorithm: capacity grows by doubling, and shrinks (``shrink``, from the periodic sweep) once a
burst has drained, never below the initial size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .journal._records_py import ItemMaker

# RAM a queued item costs beyond its data (see the Cython twin): a slots object tracked by the
# cyclic GC is larger than the C Item, so the same max_memory_size holds fewer items here.
ITEM_OVERHEAD = 216


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


# The compiled build's C-call constructor (erq/_fast/_ring.pyx); here the class call is the
# fastest way.
new_item = Item


def _item_of_record(id: int, flags: int, add_time: int, expiry: int, data: bytes) -> Item:
    return Item(id, data, flags, add_time, expiry)


# For the journal's read_behind: items read back come out of their records as Items.
ITEM_MAKER = ItemMaker(_item_of_record)


class Ring:
    """FIFO with O(1) push (tail), push_front (head), pop (head) and peek."""

    __slots__ = ("_buf", "_head", "_count", "_min_capacity")

    def __init__(self, capacity: int = 16) -> None:
        capacity = max(4, 1 << (max(capacity, 1) - 1).bit_length())
        self._buf: list[Any] = [None] * capacity
        self._head = 0
        self._count = 0
        self._min_capacity = capacity

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def _grow(self) -> None:
        buf = self._buf
        cap = len(buf)
        head = self._head
        self._buf = buf[head:] + buf[:head] + [None] * cap
        self._head = 0

    def push(self, item: Any) -> None:
        if self._count == len(self._buf):
            self._grow()
        buf = self._buf
        buf[(self._head + self._count) & (len(buf) - 1)] = item
        self._count += 1

    def push_front(self, item: Any) -> None:
        if self._count == len(self._buf):
            self._grow()
        buf = self._buf
        self._head = (self._head - 1) & (len(buf) - 1)
        buf[self._head] = item
        self._count += 1

    def pop(self) -> Any:
        if not self._count:
            raise IndexError("pop from an empty Ring")
        buf = self._buf
        head = self._head
        item = buf[head]
        buf[head] = None
        self._head = (head + 1) & (len(buf) - 1)
        self._count -= 1
        return item

    def peek(self) -> Any:
        if not self._count:
            raise IndexError("peek at an empty Ring")
        return self._buf[self._head]

    def peek_tail(self) -> Any:
        if not self._count:
            raise IndexError("peek at an empty Ring")
        buf = self._buf
        return buf[(self._head + self._count - 1) & (len(buf) - 1)]

    def clear(self) -> None:
        # Empty first: dropping the old list may run code (a __del__) that uses the ring.
        self._head = 0
        self._count = 0
        self._buf = [None] * self._min_capacity

    def __iter__(self) -> Iterator[Any]:
        buf = self._buf
        mask = len(buf) - 1
        head = self._head
        for i in range(self._count):
            yield buf[(head + i) & mask]

    def shrink(self) -> bool:
        """Give back the room of a ring that grew for a burst and has drained: once a
        quarter or less of it is used, it moves into the smallest power of two that is at
        least its initial size and twice its count. True if it moved. (Called by the periodic
        sweep, not by pop: the hot path stays a store and a decrement.)"""
        cap, count = len(self._buf), self._count
        if cap <= self._min_capacity or count > cap // 4:
            return False
        newcap = self._min_capacity
        while newcap < count * 2:
            newcap <<= 1
        if newcap >= cap:
            return False
        items = self.to_list()
        self._buf = items + [None] * (newcap - count)
        self._head = 0
        return True

    def to_list(self) -> list[Any]:
        return list(self)
