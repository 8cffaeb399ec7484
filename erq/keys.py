"""Selector for get-key parsing: ``_keys_py.py`` compiled by Cython (``erq._fast._keys``) or as is."""

from ._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from ._fast._keys import KeyError_, KeySpec, parse_key
else:
    from ._keys_py import KeyError_, KeySpec, parse_key

__all__ = ["KeyError_", "KeySpec", "parse_key"]
