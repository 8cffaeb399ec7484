"""erq: a durable, Kestrel-compatible message-queue server on the memcache text protocol."""

from ._compat import IMPLEMENTATION

__version__ = "1.0.0"
__all__ = ["IMPLEMENTATION", "__version__"]
