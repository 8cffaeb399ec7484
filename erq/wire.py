"""Selector for the reply side of the wire: the Cython extension or its pure-Python twin."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._wire import (
        VALUE_COPY_LIMIT,
        ReplyWriter,
        SocketWriter,
        append_end,
        append_value,
        clear_replies,
        peer_gone,
        value_header,
    )
else:
    from ._wire_py import (
        VALUE_COPY_LIMIT,
        ReplyWriter,
        SocketWriter,
        append_end,
        append_value,
        clear_replies,
        peer_gone,
        value_header,
    )

__all__ = [
    "VALUE_COPY_LIMIT",
    "ReplyWriter",
    "SocketWriter",
    "append_end",
    "append_value",
    "clear_replies",
    "peer_gone",
    "value_header",
]
