"""Selector for the per-request commands: ``_commands_py.py`` compiled by Cython
(``erq._fast._commands``) or as is. The other commands are ``erq.server_commands``."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._commands import dispatch, expiry_ms, feed
else:
    from ._commands_py import dispatch, expiry_ms, feed

__all__ = ["dispatch", "expiry_ms", "feed"]
