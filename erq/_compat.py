"""The one place that decides between the Cython extensions and their pure-Python twins.

``ERQ_NO_EXTENSIONS=1`` forces the twins. Otherwise the extensions are used when they
import; a build without them still runs (portability) but says so loudly at start-up.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from importlib.util import find_spec

NO_EXTENSIONS: bool = os.environ.get("ERQ_NO_EXTENSIONS", "") not in ("", "0")


# The Cython extensions of erq/_fast (setup.py builds the same list; the wheel test checks it).
FAST_MODULES: tuple[str, ...] = (
    "_parser",
    "_ring",
    "_records",
    "_replay",
    "_append",
    "_fsync",
    "_clock",
    "_wire",
) + (("_epoll",) if sys.platform.startswith("linux") else ())

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
        for name in FAST_MODULES:
            if name != "_epoll":
                import_module(f"{__package__}._fast.{name}")
    except ImportError:
        return False
    # The epoll layer (Linux) cimports the compiled protocol, which imports this module: it is
    # looked for, not imported.
    if "_epoll" in FAST_MODULES and find_spec(f"{__package__}._fast._epoll") is None:
        return False
    return compiled_twins_built()


USE_EXTENSIONS: bool = not NO_EXTENSIONS and _extensions_importable()
IMPLEMENTATION: str = "cython" if USE_EXTENSIONS else "python"
