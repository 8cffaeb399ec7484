# cython: annotation_typing=False
"""Parsing of `get` keys: ``queue[/option...]`` into a validated, cached KeySpec.

One source compiled twice (like ``_queue_py.py``): setup.py compiles it through the link
``erq/_fast/_keys.py`` with the C types of ``erq/_fast/_keys.pxd``; selector ``erq.keys``.
"""

from __future__ import annotations

from erq.names import valid_queue_name

_FORBIDDEN = (
    ("peek", "open"),
    ("peek", "close"),
    ("peek", "abort"),
    ("abort", "open"),
    ("abort", "close"),
)


class KeyError_(Exception):
    """A key that rejects the whole request: the reply line and whether to close."""

    def __init__(self, reply: bytes, close: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.close = close


# The longest wait a t= asks for, ~31.7 years (the server's Deadlines cut every wait there):
# more digits are read as this, not parsed.
MAX_WAIT_MS = 10**12

# The replies, raised as a new KeyError_ each time: an exception object raised again keeps
# the tracebacks of every earlier raise, and with them (pure build) each request's frames,
# session and transport, for as long as the process lives.
BAD_NAME = b"CLIENT_ERROR bad queue name\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
# PROTOCOL §4: a forbidden option combination gets Kestrel's bare CLIENT_ERROR, then close.
FORBIDDEN_COMBINATION = b"CLIENT_ERROR\r\n"


class KeySpec:
    """One key of a get: the queue name and its options (PROTOCOL §4)."""

    __slots__ = (
        "key",
        "name",
        "prefix",
        "kestrel_prefix",
        "timeout",
        "open",
        "close",
        "abort",
        "peek",
        "fetches",
    )

    def __init__(self, key: bytes) -> None:
        parts = key.split(b"/")
        raw_name = parts[0]
        if not valid_queue_name(raw_name):
            raise KeyError_(BAD_NAME, False)
        self.key = key
        self.name = raw_name.decode("ascii")
        # The start of a VALUE line for this key, made once per distinct key (the cache):
        # memcache names the key as asked, Kestrel (compat mode) the bare queue name.
        self.prefix = b"VALUE " + key + b" "
        self.kestrel_prefix = b"VALUE " + raw_name + b" "
        self.timeout: int | None = None
        self.open = self.close = self.abort = self.peek = False
        for opt in parts[1:]:
            if opt == b"open":
                self.open = True
            elif opt == b"close":
                self.close = True
            elif opt == b"abort":
                self.abort = True
            elif opt == b"peek":
                self.peek = True
            elif opt.startswith(b"t="):
                # An integer, signed as Kestrel's toInt allows: a wait computed from a deadline
                # already past (negative) waits not at all.
                value = opt[2:]
                negative = value[:1] == b"-"
                if value[:1] in (b"-", b"+"):
                    value = value[1:]
                if not value or not value.isdigit():
                    raise KeyError_(BAD_FORMAT, False)
                digits = value.lstrip(b"0") or b"0"  # int() of thousands of digits would raise
                if negative:
                    self.timeout = 0
                else:
                    self.timeout = int(digits) if len(digits) <= 12 else MAX_WAIT_MS
            # unknown options are ignored (Kestrel)
        for a, b in _FORBIDDEN:
            if getattr(self, a) and getattr(self, b):
                raise KeyError_(FORBIDDEN_COMBINATION, True)
        # abort never fetches; close without open only confirms.
        self.fetches = not self.abort and not (self.close and not self.open)


_cache: dict[bytes, KeySpec] = {}
_CACHE_MAX = 4096
# Longer keys are parsed each time, not cached: a spec holds its key twice, and a key may be
# as long as max_line, so 4,096 of them could hold half a gigabyte after their clients left.
# A queue name is at most 250 bytes; its options rarely take more than a few dozen.
_CACHE_KEY_MAX = 512


def parse_key(key: bytes) -> KeySpec:
    """Return the KeySpec of ``key``; raises KeyError_. Hot keys are parsed once."""
    spec = _cache.get(key)
    if spec is None:
        spec = KeySpec(key)
        if len(key) <= _CACHE_KEY_MAX:
            if len(_cache) >= _CACHE_MAX:
                _cache.clear()
            _cache[key] = spec
    return spec
