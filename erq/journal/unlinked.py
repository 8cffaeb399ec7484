"""Has an open file lost its last name? Asked after every journal sync, without a stat.

A file or directory deleted under the server still syncs, but no restart can find what it
holds, so a sync must not count as durable then. ``fstat`` would tell (``st_nlink == 0``),
but it also reads the file's timestamps, and on kernels with multigrain timestamps (Linux
6.13 on, ext4, xfs, btrfs, tmpfs) a read timestamp makes the next write through the
journal's mapping take a fine-grained mtime: a dirty inode on every write instead of once a
clock tick. On ext4 without a journal the next fdatasync then writes the inode's block as
well, a third I/O beside the data and the cache flush (with ``fsync = "always"``, one
connection's sets went ~5.0k -> ~3.8k/s here). ``/proc/self/fd/N`` names the file without
reading its attributes, and ends with `` (deleted)`` once it has no name; only then (or
where there is no ``/proc``) is ``fstat`` asked to confirm. erq/_fast/_fsync.pyx does the
same in C.
"""

from __future__ import annotations

import os

_DELETED = " (deleted)"


def unlinked(fd: int) -> bool:
    """True when ``fd``'s file or directory has no name left; False also when it cannot be
    told (``fstat`` failing on a descriptor that was just synced), as in the C twin."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (not Linux, or not mounted): ask the inode
        target = None
    # A name that merely ends so (a data directory called "x (deleted)") is confirmed too.
    if target is not None and not target.endswith(_DELETED):
        return False
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False
