"""The one place that decides between the Cython extensions and their pure-Python twins.

``ERQ_NO_EXTENSIONS=1`` forces the twins. Otherwise the extensions are used when they
import; a build without them still runs (portability) but says so loudly at start-up.
"""

from __future__ import annotations

import os

NO_EXTENSIONS: bool = os.environ.get("ERQ_NO_EXTENSIONS", "") not in ("", "0")


def _extensions_importable() -> bool:
    try:
        from ._fast import _journal, _parser, _ring  # noqa: F401
    except ImportError:
        return False
    return True


USE_EXTENSIONS: bool = not NO_EXTENSIONS and _extensions_importable()
IMPLEMENTATION: str = "cython" if USE_EXTENSIONS else "python"
