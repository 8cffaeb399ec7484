"""The one place that decides between the Cython extensions and their pure-Python twins.

``ERQ_NO_EXTENSIONS=1`` forces the twins. Otherwise the extensions are used when they
import; a build without them still runs (portability) but says so loudly at start-up.
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec

NO_EXTENSIONS: bool = os.environ.get("ERQ_NO_EXTENSIONS", "") not in ("", "0")


# Modules of erq compiled from their pure-Python source (erq/_fast/<name>.py links to it).
COMPILED_TWINS = ("_queue", "_queues", "_keys", "_session", "_commands", "_state", "_protocol")


def compiled_twins_built() -> bool:
    """True when every compiled twin is an extension module.

    A twin imports as plain Python where it was not compiled, and importing it here would be
    circular (it imports this module): where it would load from tells.
    """
    for name in COMPILED_TWINS:
        spec = find_spec(f"{__package__}._fast.{name}")
        if spec is None or spec.origin is None or spec.origin.endswith(".py"):
            return False
    return True


def _extensions_importable() -> bool:
    try:
        from ._fast import (  # noqa: F401
            _append,
            _clock,
            _fsync,
            _parser,
            _records,
            _replay,
            _ring,
            _wire,
        )
    except ImportError:
        return False
    # The epoll layer (Linux) cimports the compiled protocol, which imports this module: it is
    # looked for, not imported.
    if sys.platform.startswith("linux") and find_spec(f"{__package__}._fast._epoll") is None:
        return False
    return compiled_twins_built()


USE_EXTENSIONS: bool = not NO_EXTENSIONS and _extensions_importable()
IMPLEMENTATION: str = "cython" if USE_EXTENSIONS else "python"
