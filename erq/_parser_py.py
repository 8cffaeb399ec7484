"""memcache text-protocol request parser, pure Python (twin of erq/_fast/_parser.pyx).

This is the behavioural reference; the Cython module is an optimisation of it and must give
identical results for every byte stream cut at any point.

Buffering invariant: ``_buf`` is non-empty only between feeds and only while the state is
_LINE (one unfinished line: no newline, shorter than ``max_line``) or _TRAILER (fewer than the
two trailer bytes). A new chunk tops it up with just enough bytes to finish that line or
trailer, and the rest of the chunk is parsed in place.
"""

from __future__ import annotations

import sys

__all__ = [
    "NO_ROOM",
    "REQ_BINARY",
    "REQ_CMD",
    "REQ_ERROR",
    "REQ_GET",
    "REQ_SET",
    "REQ_UNSUPPORTED",
    "FIRST_ROOM",
    "DataBudget",
    "Parser",
    "next_room",
]

REQ_SET = 1
REQ_GET = 2
REQ_CMD = 3
REQ_UNSUPPORTED = 4
REQ_ERROR = 5
REQ_BINARY = 6

_ERR_FORMAT = (REQ_ERROR, b"CLIENT_ERROR bad command line format\r\n", True)
_ERR_CHUNK = (REQ_ERROR, b"CLIENT_ERROR bad data chunk\r\n", True)
_ERR_TOO_LONG = (REQ_ERROR, b"CLIENT_ERROR line too long\r\n", True)
_BINARY = (REQ_BINARY,)
# The data of a set refused for want of room in the DataBudget (its bytes were skipped).
NO_ROOM = False
# The compiled twin hands a repeated token up to this long on as the same object (this one
# makes new ones).
REUSED_TOKEN_MAX = 256
# A data block still arriving takes room as its bytes come: what came first, at least this
# much (its whole size if smaller), then twice its room, or what came if that is more, up to
# its size. The C twin allocates the block so; this twin counts the same room.
FIRST_ROOM = 4096

# Parser states.
_LINE = 0  # expecting a request line
_DATA = 1  # collecting a data block that did not arrive in one piece
_TRAILER = 2  # data block complete, waiting for its b"\r\n"
_SKIP = 3  # discarding a data block (oversized, or no room for it) and its trailer

# Results of _line().
_DONE = 0  # request emitted
_PENDING = 1  # storage command: a data block follows (_p_* fields set)
_CLOSED = 2  # closing error emitted

# Storage words other than set -> the indexes (in the token list, word included) of the byte
# count and of noreply. memcached's meta set (``ms <key> <datalen> <flags>*``) has a data block
# too, which must be skipped, not run as requests; its quiet flag still lets errors through.
_UNSUPPORTED_STORAGE = {
    b"add": (4, 5),
    b"replace": (4, 5),
    b"append": (4, 5),
    b"prepend": (4, 5),
    b"cas": (4, 6),
    b"ms": (2, 0),
}
_MAX_COUNT_DIGITS = 19
_U32_MAX = 2**32 - 1
_I64_MAX = 2**63 - 1
_I64_MIN = -(2**63)


def _flags(tok: bytes) -> int | None:
    # isdigit() on bytes is ASCII-only and rejects '', '+', '-', '_' and spaces (int() would not).
    if not tok.isdigit():
        return None
    tok = tok.lstrip(b"0")
    if len(tok) > 10:  # also keeps int() clear of its digit-count limit
        return None
    value = int(tok) if tok else 0
    return value if value <= _U32_MAX else None


def _exptime(tok: bytes) -> int | None:
    negative = tok[:1] == b"-"
    digits = tok[1:] if negative else tok
    if not digits.isdigit():
        return None
    digits = digits.lstrip(b"0")
    if len(digits) > 19:
        return None
    value = int(digits) if digits else 0
    if negative:
        value = -value
        return value if value >= _I64_MIN else None
    return value if value <= _I64_MAX else None


def next_room(room: int, need: int, size: int) -> int:
    """The room of a block of ``size`` bytes that holds ``room`` and must take ``need``."""
    return min(size, max(2 * room, need, FIRST_ROOM))


class DataBudget:
    """The data that storage requests still arriving may hold, over every connection of a
    server (``max_pending_data``). A request whose data does not come whole in one read holds
    the room its data takes as it arrives (``next_room``), until the last byte is in: the
    memory a client can make the server hold is what it has sent, not what it says it will
    send. A request whose next bytes find no room drops what it holds and is skipped to its
    end, and a set is refused (``NO_ROOM``: ``SERVER_ERROR out of memory storing object``,
    memcached's reply when it has no memory for an item). A request whose room is the only
    room held always gets more, so any item up to ``max_item_size`` can come through alone."""

    __slots__ = ("limit", "held", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # bytes held for requests whose data is arriving
        self.refused = 0  # requests refused for want of room

    def take(self, size: int, holding: int = 0) -> bool:
        """Hold ``size`` more bytes for a request's data that holds ``holding`` already, if
        they fit or nothing else is held (a refusal is counted)."""
        if self.held != holding and self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        """The data ``take`` or ``hold`` held for is in, or will never come."""
        self.held -= size

    def hold(self, size: int) -> None:
        """Count ``size`` bytes already in memory, room or not (a set's data that waits a
        pass of the loop: it cannot be refused for the server's own pause)."""
        self.held += size


class Parser:
    """Stateful memcache text-protocol parser: bytes in, request tuples out. With a
    ``budget`` (a DataBudget shared by a server's connections), a data block that does not
    arrive in one piece is read only if the budget has room for it."""

    __slots__ = (
        "_max_line",
        "_max_item",
        "_buf",
        "_state",
        "_closed",
        "_p_set",
        "_p_word",
        "_p_name",
        "_p_flags",
        "_p_exptime",
        "_p_noreply",
        "_p_count",
        "_p_block",
        "_p_chunks",
        "_p_filled",
        "_skip_left",
        "_no_room",
        "_budget",
        "_held",
        "stopped_at",
        "extra_keys",
    )

    def __init__(
        self,
        max_line: int = 65536,
        max_item_size: int = 64 * 1024 * 1024,
        budget: DataBudget | None = None,
    ) -> None:
        self.set_limits(max_line, max_item_size)
        if budget is not None and not isinstance(budget, DataBudget):
            raise TypeError(f"budget must be a DataBudget, not {type(budget).__name__}")
        self._budget = budget
        self._held = 0  # what the block being read holds in the budget
        self.stopped_at = 0  # where the last feed stopped (see feed)
        self.extra_keys = 0  # the last feed's get keys beyond each get's first (see feed)
        self._buf = bytearray()
        self._state = _LINE
        self._closed = False
        self._skip_left = 0
        self._no_room = False
        self._release()

    def set_limits(self, max_line: int, max_item_size: int) -> None:
        """The longest line and the largest data block from the next request line on (a
        reload changes them on open connections); a block already being read keeps the limit
        its line was checked against."""
        max_line = max_line.__index__()
        max_item_size = max_item_size.__index__()
        if not 1 <= max_line <= sys.maxsize:
            raise ValueError(f"max_line must be between 1 and {sys.maxsize}")
        if not 0 <= max_item_size <= sys.maxsize:
            raise ValueError(f"max_item_size must be between 0 and {sys.maxsize}")
        self._max_line = max_line
        self._max_item = max_item_size

    @property
    def buffered(self) -> int:
        """Bytes held waiting for more input (skipped bytes are never held)."""
        held = len(self._buf)
        if self._state == _DATA:
            held += self._p_filled
        elif self._state == _TRAILER:
            held += len(self._p_block)
        return held

    @property
    def closed(self) -> bool:
        """True once a closing error (or REQ_BINARY) was returned; input is then ignored."""
        return self._closed

    def feed(self, data: bytes, start: int = 0, limit: int = 0) -> list[tuple]:
        """Consume one received chunk, from ``start``; return every request it completed, in
        order. With a ``limit``, stop before the next request line once that many are
        complete, a get counting one per key (``extra_keys`` says how many more than the
        requests that makes): ``stopped_at`` then says where, and the bytes from there on
        are neither parsed nor kept (feed them again). Otherwise ``stopped_at`` is
        ``len(data)``."""
        out: list[tuple] = []
        n = len(data)
        self.stopped_at = n
        self.extra_keys = 0
        if self._closed:
            return out
        if type(data) is not bytes:
            data = bytes(data)
        if not 0 <= start <= n:
            raise ValueError(f"start {start} is outside the data ({n} bytes)")
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        pos = start
        buf = self._buf
        while buf and pos < n:
            # Finish the buffered line / trailer with just enough of the new chunk.
            if self._state == _TRAILER:
                take = min(2 - len(buf), n - pos)
                buf += data[pos : pos + take]
                pos += take
            else:
                take = max(0, min(self._max_line - len(buf), n - pos))
                nl = data.find(b"\n", pos, pos + take)
                if nl >= 0:
                    take = nl + 1 - pos
                buf += data[pos : pos + take]
                pos += take
                if nl < 0 and len(buf) < self._max_line:
                    return out  # still one unfinished line, and all of data is in it
            used = self._run(bytes(buf), 0, out)
            if self._closed:
                return out
            del buf[:used]
        if pos < n:
            pos = self._run(data, pos, out, limit)
            if not self._closed and pos < n:
                if limit and len(out) + self.extra_keys >= limit and self._state == _LINE:
                    self.stopped_at = pos
                    return out
                buf += data[pos:]
        return out

    def __del__(self) -> None:
        # A parser dropped without discard() gives its room back, as the C twin's dealloc
        # does (one whose __init__ failed holds nothing).
        if getattr(self, "_held", 0):
            self._give_back()

    def discard(self) -> None:
        """The connection is gone: take no more input, and give back what the data block
        being read holds in the budget."""
        self._closed = True
        self._state = _LINE
        self._release()
        self._buf = bytearray()

    def _close(self, out: list[tuple], reply: tuple) -> None:
        # The closing reply is always the last element of out: callers return right after.
        out.append(reply)
        self.discard()

    def _give_back(self) -> None:
        if self._held:
            self._budget.give(self._held)
            self._held = 0

    def _release(self) -> None:
        self._give_back()
        self._p_set = False
        self._p_word = None
        self._p_name = None
        self._p_flags = None
        self._p_exptime = None
        self._p_noreply = False
        self._p_count = 0
        self._p_block = None
        self._p_chunks = None
        self._p_filled = 0

    def _emit(self, out: list[tuple], data: bytes | None) -> None:
        if self._p_set:
            out.append(
                (REQ_SET, self._p_name, self._p_flags, self._p_exptime, data, self._p_noreply)
            )
        else:
            out.append((REQ_UNSUPPORTED, self._p_word, self._p_noreply))
        self._release()
        self._state = _LINE

    def _run(self, buf: bytes, pos: int, out: list[tuple], limit: int = 0) -> int:
        """Parse buf[pos:]; return the position of the first byte not consumed (with a
        ``limit``, the start of the next request line once ``out`` holds that many)."""
        n = len(buf)
        max_line = self._max_line
        while pos < n:
            state = self._state
            if state == _LINE:
                if limit and len(out) + self.extra_keys >= limit:
                    return pos
                if buf[pos] == 0x80:
                    self._close(out, _BINARY)
                    return n
                nl = buf.find(b"\n", pos, pos + max_line)
                if nl < 0:
                    if n - pos >= max_line:
                        self._close(out, _ERR_TOO_LONG)
                        return n
                    return pos
                end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
                result = self._line(buf[pos:end], out)
                pos = nl + 1
                if result == _CLOSED:
                    return n
                if result == _PENDING:
                    count = self._p_count
                    if count > self._max_item:
                        self._skip_left = count + 2
                        self._state = _SKIP
                    elif n - pos >= count:
                        self._p_block = buf[pos : pos + count]
                        pos += count
                        self._state = _TRAILER
                    elif self._budget is not None and not self._budget.take(
                        room := next_room(0, n - pos, count)
                    ):
                        self._no_room = True
                        self._skip_left = count + 2
                        self._state = _SKIP
                    else:
                        if self._budget is not None:
                            self._held = room
                        self._p_chunks = [buf[pos:]]
                        self._p_filled = n - pos
                        pos = n
                        self._state = _DATA
            elif state == _TRAILER:
                if n - pos < 2:
                    return pos
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    self._close(out, _ERR_CHUNK)
                    return n
                pos += 2
                self._emit(out, self._p_block)
            elif state == _DATA:
                take = min(self._p_count - self._p_filled, n - pos)
                need = self._p_filled + take
                if self._budget is not None and need > self._held:
                    room = next_room(self._held, need, self._p_count)
                    if not self._budget.take(room - self._held, self._held):
                        # No room for more: what came is dropped, the rest skipped.
                        self._give_back()
                        self._p_chunks = None
                        self._no_room = True
                        self._skip_left = self._p_count - self._p_filled + 2
                        self._state = _SKIP
                        continue
                    self._held = room
                # Chunks are collected and joined once: no growing buffer re-copied per chunk.
                self._p_chunks.append(buf if take == n else buf[pos : pos + take])
                self._p_filled += take
                pos += take
                if self._p_filled == self._p_count:
                    self._p_block = b"".join(self._p_chunks)
                    self._p_chunks = None
                    self._give_back()
                    self._state = _TRAILER
            else:  # _SKIP
                if n - pos < self._skip_left:
                    self._skip_left -= n - pos
                    return n
                pos += self._skip_left
                self._skip_left = 0
                no_room, self._no_room = self._no_room, False
                self._emit(out, NO_ROOM if no_room else None)
        return pos

    def _line(self, line: bytes, out: list[tuple]) -> int:
        """Handle one request line (terminator already removed)."""
        tokens = line.split(b" ")
        if b"" in tokens:  # runs of spaces, or leading/trailing ones
            tokens = [t for t in tokens if t]
            if not tokens:
                out.append((REQ_CMD, b"", []))
                return _DONE
        word = tokens[0].lower()
        if word == b"get" or word == b"gets":
            if len(tokens) > 2:
                self.extra_keys += len(tokens) - 2
            out.append((REQ_GET, tuple(tokens[1:]), word == b"gets"))
            return _DONE
        is_set = word == b"set"
        if is_set:
            at, k = 4, 5
        elif word in _UNSUPPORTED_STORAGE:
            at, k = _UNSUPPORTED_STORAGE[word]
        else:
            out.append((REQ_CMD, word, tokens[1:]))
            return _DONE
        ntok = len(tokens)
        if ntok <= at:
            self._close(out, _ERR_FORMAT)
            return _CLOSED
        count = tokens[at]
        if not count.isdigit():
            self._close(out, _ERR_FORMAT)
            return _CLOSED
        count = count.lstrip(b"0") or b"0"  # leading zeros are no reason to refuse
        if len(count) > _MAX_COUNT_DIGITS:
            self._close(out, _ERR_FORMAT)
            return _CLOSED
        self._p_count = int(count)
        self._p_set = is_set
        if is_set:
            self._p_name = tokens[1]
            if ntok > 6:  # more than 5 arguments: a format error, the data is still read
                self._p_flags = None
                self._p_exptime = None
            else:
                self._p_flags = _flags(tokens[2])
                self._p_exptime = _exptime(tokens[3])
            # noreply only as the last argument: a line with more is malformed, answered.
            self._p_noreply = ntok == 6 and tokens[5] == b"noreply"
        else:
            self._p_word = word
            self._p_noreply = k > 0 and ntok > k and tokens[k] == b"noreply"
        return _PENDING
