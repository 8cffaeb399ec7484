"""erq: a durable, Kestrel-compatible message-queue server on the memcache text protocol."""

from __future__ import annotations

__version__ = "1.0.0"
__all__ = ["IMPLEMENTATION", "__version__"]


def __getattr__(name: str) -> str:
    # The build (Cython or pure Python) is chosen when first asked for, not when the package is
    # imported: ``erq serve`` holds its stop and reload signals before it loads any of it.
    if name == "IMPLEMENTATION":
        from ._compat import IMPLEMENTATION

        return IMPLEMENTATION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
