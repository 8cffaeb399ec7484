"""Selector for the request parser: the Cython extension or its pure-Python twin.

Request tuples (see ``Parser.feed``):

- ``(REQ_SET, name, flags, exptime, data, noreply)``: flags/exptime are None when malformed,
  data is None when the item was over ``max_item_size``, ``NO_ROOM`` when the DataBudget had
  no room for it (its bytes were skipped either way);
- ``(REQ_GET, keys, is_gets)``: keys a tuple of bytes;
- ``(REQ_CMD, word, args)``: any other line, word lowercased (b"" for an empty line);
- ``(REQ_UNSUPPORTED, word, noreply)``: add/replace/append/prepend/cas and
  memcached's meta set ``ms``, data block consumed;
- ``(REQ_ERROR, reply, True)``: a closing error, the reply to send before closing;
- ``(REQ_BINARY,)``: the binary protocol's magic byte, close without a reply.
"""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._parser import (
        NO_ROOM,
        REQ_BINARY,
        REQ_CMD,
        REQ_ERROR,
        REQ_GET,
        REQ_SET,
        REQ_UNSUPPORTED,
        REUSED_TOKEN_MAX,
        DataBudget,
        Parser,
    )
else:
    from ._parser_py import (
        NO_ROOM,
        REQ_BINARY,
        REQ_CMD,
        REQ_ERROR,
        REQ_GET,
        REQ_SET,
        REQ_UNSUPPORTED,
        REUSED_TOKEN_MAX,
        DataBudget,
        Parser,
    )

__all__ = [
    "NO_ROOM",
    "REQ_BINARY",
    "REQ_CMD",
    "REQ_ERROR",
    "REQ_GET",
    "REQ_SET",
    "REQ_UNSUPPORTED",
    "REUSED_TOKEN_MAX",
    "DataBudget",
    "Parser",
]
