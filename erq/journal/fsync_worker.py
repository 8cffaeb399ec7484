"""FsyncWorker selector: the Cython module (a thread that never takes the GIL) when built and
allowed, else the pure twin."""

from .._compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from .._fast._fsync import FsyncWorker
else:
    from ._fsync_py import FsyncWorker

__all__ = ["FsyncWorker"]
