"""A FUSE file system over a directory whose writes fail with EIO on demand.

Run as ``python failfs.py BACKING MOUNTPOINT``: every file operation passes through to
BACKING, except that while ``BACKING/.fail-writes`` exists every write (a ``write`` call or
the kernel writing back dirty pages of a mapping) and every fsync answers EIO. The kernel
then treats the failed pages as a disk would make it: they turn clean with their data never
stored, and the next fsync reports success. Unmounting drops the page cache, so what the
backing directory holds afterwards is what a power cut would have left.
"""

from __future__ import annotations

import errno
import os
import sys

import mfusepy as fuse

FAIL_SWITCH = ".fail-writes"


class FailFS(fuse.Operations):
    use_ns = True  # utimens gets nanoseconds

    def __init__(self, root: str) -> None:
        self.root = root
        self.switch = os.path.join(root, FAIL_SWITCH)

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _check_failing(self) -> None:
        if os.path.exists(self.switch):
            raise fuse.FuseOSError(errno.EIO)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size")
        attrs = {key: getattr(st, key) for key in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def utimens(self, path, times=None):
        os.utime(self._path(path), ns=times)

    def open(self, path, flags):
        return os.open(self._path(path), flags & ~os.O_DIRECT | os.O_CLOEXEC)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self._check_failing()
        return os.pwrite(fh, data, offset)

    def fallocate(self, path, mode, offset, length, fh):
        os.posix_fallocate(fh, offset, length)
        return 0

    def fsync(self, path, datasync, fh):
        self._check_failing()
        os.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {key: getattr(st, key) for key in (*keys, "f_flag", "f_frsize", "f_namemax")}


if __name__ == "__main__":
    backing, mountpoint = sys.argv[1:3]
    fuse.FUSE(FailFS(backing), mountpoint, foreground=True, nothreads=False)
