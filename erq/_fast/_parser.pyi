from typing import Any, Final

REQ_SET: Final[int]
REQ_GET: Final[int]
REQ_CMD: Final[int]
REQ_UNSUPPORTED: Final[int]
REQ_ERROR: Final[int]
REQ_BINARY: Final[int]
NO_ROOM: Final[bool]
FIRST_ROOM: Final[int]

def next_room(room: int, need: int, size: int) -> int: ...

class DataBudget:
    limit: int
    held: int
    refused: int
    def __init__(self, limit: int) -> None: ...
    def take(self, size: int, holding: int = 0) -> bool: ...
    def give(self, size: int) -> None: ...

class Parser:
    def __init__(
        self,
        max_line: int = 65536,
        max_item_size: int = 67108864,
        budget: DataBudget | None = None,
    ) -> None: ...
    def discard(self) -> None: ...
    def set_limits(self, max_line: int, max_item_size: int) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def feed(self, data: bytes) -> list[tuple[Any, ...]]: ...
