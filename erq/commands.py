"""Selector for the commands: ``_commands_py.py`` compiled by Cython (``erq._fast._commands``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._commands import COMMANDS, dispatch, expiry_ms, feed, general_stats
else:
    from ._commands_py import COMMANDS, dispatch, expiry_ms, feed, general_stats

__all__ = ["COMMANDS", "dispatch", "expiry_ms", "feed", "general_stats"]
