# cython: language_level=3
"""An fsync worker on a plain POSIX thread that never takes the GIL (twin:
erq/journal/_fsync_py.py; selector erq.journal.fsync_worker).

The owner (the event loop thread) hands it one job at a time: file descriptors to fdatasync
and directory descriptors to fsync. The thread syncs and closes every descriptor, records
each errno, and then makes the notification descriptor readable, which the loop watches with
add_reader. A finished job costs the loop one wake-up and one read, and no GIL hand-off.

Two channels, each an eventfd on Linux and a pipe elsewhere, carry the hand-offs; there is no
mutex, whose contended unlock after a condition wait costs glibc one more futex call per job:

- owner -> thread, ``wake``: the owner fills the job, stores ``pending`` (release) and writes
  ``wake``; the thread sleeps in a blocking read of ``wake``, then loads ``pending`` (acquire).
  ``stop`` goes the same way; a job submitted before the stop still runs.
- thread -> owner, ``notify``: the thread stores the errnos, then ``done`` (release), then
  writes ``notify``. The owner loads ``done`` (acquire) before it reads ``notify``: seen 0,
  nothing was posted yet; seen 1, the post is written or about to be (the thread does nothing
  in between), so collect reads it, waiting for it if need be. ``notify`` is thus readable
  exactly while a finished job waits to be collected.
"""

cimport cython
from cpython.exc cimport PyErr_SetFromErrno
from libc.stdlib cimport free, realloc
from libc.string cimport strerror
from posix.unistd cimport close


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    int pthread_join(pthread_t thread, void **retval)


cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <string.h>
    #include <unistd.h>
    #include <sys/stat.h>
    #ifdef __linux__
    #include <sys/eventfd.h>
    #endif

    /* A channel: fds[0] is read, fds[1] written (one eventfd on Linux), close-on-exec; the
       write end never blocks, the read end blocks unless ``nonblocking_read``. -1 with errno
       on failure. */
    static int erq_channel_open(int fds[2], int nonblocking_read) {
    #ifdef __linux__
        int fd = eventfd(0, EFD_CLOEXEC | (nonblocking_read ? EFD_NONBLOCK : 0));
        if (fd < 0) return -1;
        fds[0] = fds[1] = fd;
        return 0;
    #else
        int i;
        if (pipe(fds) < 0) return -1;
        for (i = 0; i < 2; i++) {
            int nonblocking = i == 1 || nonblocking_read;
            if ((nonblocking && fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK) < 0)
                    || fcntl(fds[i], F_SETFD, FD_CLOEXEC) < 0) {
                int saved = errno;
                close(fds[0]);
                close(fds[1]);
                fds[0] = fds[1] = -1;
                errno = saved;
                return -1;
            }
        }
        return 0;
    #endif
    }

    static void erq_channel_close(int fds[2]) {
        if (fds[0] >= 0) close(fds[0]);
        if (fds[1] >= 0 && fds[1] != fds[0]) close(fds[1]);
        fds[0] = fds[1] = -1;
    }

    /* At most two posts are outstanding on a channel (a job and a stop), so neither the
       eventfd counter nor the pipe can be full. */
    static void erq_channel_post(int wfd) {
        ssize_t n;
    #ifdef __linux__
        uint64_t one = 1;
        do n = write(wfd, &one, sizeof one); while (n < 0 && errno == EINTR);
    #else
        char one = 1;
        do n = write(wfd, &one, 1); while (n < 0 && errno == EINTR);
    #endif
        (void)n;
    }

    /* Wait (without the GIL) until the channel is readable. */
    static void erq_channel_wait(int rfd) {
        struct pollfd p;
        p.fd = rfd;
        p.events = POLLIN;
        while (poll(&p, 1, -1) < 0 && errno == EINTR) {
        }
    }

    /* Consume what was posted (every post at once), waiting for a post if there is none. */
    static void erq_channel_take(int rfd) {
    #ifdef __linux__
        uint64_t value;
    #else
        char value[16];
    #endif
        for (;;) {
            ssize_t n = read(rfd, &value, sizeof value);
            if (n >= 0)
                return;  /* 0 (a pipe's writer gone) cannot happen while both sides live */
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                erq_channel_wait(rfd);
            else if (errno != EINTR)
                return;
        }
    }

    static int erq_load_acquire(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static void erq_store_release(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

    /* Has fd's file or directory lost its last name? Without a stat where /proc tells: an
       fstat reads the timestamps, and with multigrain timestamps that makes the next write
       through the journal's mapping dirty the inode, which fdatasync on ext4 without a
       journal then writes too (twin: erq/journal/unlinked.py, which says more). */
    static int erq_unlinked(int fd) {
        struct stat st;
    #ifdef __linux__
        static const char suffix[] = " (deleted)";
        const size_t slen = sizeof suffix - 1;
        char path[40], target[4096];
        ssize_t n;
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        n = readlink(path, target, sizeof target);
        if (n >= 0 && n < (ssize_t)sizeof target
                && ((size_t)n < slen || memcmp(target + n - slen, suffix, slen) != 0))
            return 0;  /* named; a target that fills the buffer may be cut short: confirm */
    #endif
        return fstat(fd, &st) == 0 && st.st_nlink == 0;
    }

    /* fdatasync where it exists (macOS declares none: fsync there), fsync for directories.
       Returns 0 or the errno; retries an interrupted call. A file or directory deleted
       under the server syncs, but no restart can find it: ENOENT. */
    static int erq_sync_fd(int fd, int data_only) {
        int rc;
        do {
    #if defined(__APPLE__)
            (void)data_only;
            rc = fsync(fd);
    #else
            rc = data_only ? fdatasync(fd) : fsync(fd);
    #endif
        } while (rc < 0 && errno == EINTR);
        if (rc < 0)
            return errno;
        return erq_unlinked(fd) ? ENOENT : 0;
    }

    /* Start a thread with every signal blocked, so that signals keep going to the threads that
       run Python code, and name it erq-fsync (before this returns) where the system allows. */
    static int erq_start_thread(pthread_t *thread, void *(*run)(void *), void *arg) {
        sigset_t all, old;
        int rc;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        rc = pthread_create(thread, NULL, run, arg);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    #if defined(__linux__) && defined(__GLIBC__)
        if (rc == 0)
            pthread_setname_np(*thread, "erq-fsync");
    #endif
        return rc;
    }
    """
    int erq_channel_open(int fds[2], int nonblocking_read) nogil
    void erq_channel_close(int fds[2]) nogil
    void erq_channel_post(int wfd) nogil
    void erq_channel_wait(int rfd) nogil
    void erq_channel_take(int rfd) nogil
    int erq_load_acquire(int *p) nogil
    void erq_store_release(int *p, int v) nogil
    int erq_sync_fd(int fd, int data_only) nogil
    int erq_start_thread(pthread_t *thread, void *(*run)(void *) noexcept nogil, void *arg) nogil


cdef struct _Core:
    # Shared with the thread. The flags are loaded and stored atomically. The job arrays are
    # the owner's until it sets ``pending``, the thread's until it sets ``done``, and read by
    # the owner after that.
    int wake[2]  # owner -> thread: a job or the stop; the thread blocks reading wake[0]
    int notify[2]  # thread -> owner: a job finished; non-blocking, watched by the loop
    int pending
    int stop
    int done
    int *fds  # the job: ``n`` descriptors, the first ``ndata`` get fdatasync, the rest fsync
    int *errs  # errno per descriptor, written by the thread
    Py_ssize_t n
    Py_ssize_t ndata
    Py_ssize_t cap  # allocated length of fds and errs


cdef void *_run(void *arg) noexcept nogil:
    """The thread: run jobs until stopped. A job submitted before the stop still runs."""
    cdef _Core *core = <_Core *>arg
    cdef Py_ssize_t i
    while True:
        erq_channel_take(core.wake[0])
        if erq_load_acquire(&core.pending):
            erq_store_release(&core.pending, 0)
            for i in range(core.n):
                core.errs[i] = erq_sync_fd(core.fds[i], i < core.ndata)
                close(core.fds[i])  # ours since submit; its errors say nothing of durability
            erq_store_release(&core.done, 1)
            erq_channel_post(core.notify[1])
        if erq_load_acquire(&core.stop):
            return NULL


@cython.final
cdef class FsyncWorker:
    """One thread that syncs one job of descriptors at a time; see the module docstring."""

    cdef _Core _core  # lives in the object, which outlives the thread (joined before free)
    cdef pthread_t _thread
    cdef bint _started  # the thread exists and has not been joined
    cdef bint _busy  # the owner's view: a job was submitted and not yet collected
    cdef bint _closed

    def __cinit__(self):
        self._core.wake[0] = self._core.wake[1] = -1
        self._core.notify[0] = self._core.notify[1] = -1
        self._core.fds = NULL
        self._core.errs = NULL
        self._core.pending = self._core.stop = self._core.done = 0
        self._core.n = self._core.ndata = self._core.cap = 0
        if erq_channel_open(self._core.wake, False) < 0:
            PyErr_SetFromErrno(OSError)
        if erq_channel_open(self._core.notify, True) < 0:
            PyErr_SetFromErrno(OSError)
        cdef int rc = erq_start_thread(&self._thread, _run, &self._core)
        if rc != 0:
            raise OSError(rc, strerror(rc).decode(errors="replace"))
        self._started = True

    def __dealloc__(self):
        # A worker dropped without close(): stop and join the thread here. The thread never
        # needs the GIL, so joining cannot deadlock; it waits at most for the job in flight.
        self._shutdown()
        free(self._core.fds)
        free(self._core.errs)
        self._core.fds = self._core.errs = NULL

    cdef void _shutdown(self) noexcept:
        if self._started:
            erq_store_release(&self._core.stop, 1)
            erq_channel_post(self._core.wake[1])
            with nogil:
                pthread_join(self._thread, NULL)
            self._started = False
        erq_channel_close(self._core.wake)
        erq_channel_close(self._core.notify)

    cdef int _check_open(self) except -1:
        if self._closed:
            raise ValueError("FsyncWorker is closed")
        return 0

    def fileno(self) -> int:
        """Readable while a finished job waits for :meth:`collect`."""
        self._check_open()
        return self._core.notify[0]

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def submit(self, list fds not None, list dirs not None) -> None:
        """Start a job: fdatasync each of ``fds``, then fsync each of ``dirs``. The worker owns
        the descriptors from here on and closes them; if this raises, they stay the caller's."""
        cdef Py_ssize_t ndata = len(fds), n = ndata + len(dirs), i
        cdef int *buf
        self._check_open()
        if self._busy:
            raise RuntimeError("FsyncWorker: a job is in flight; collect() it first")
        if n > self._core.cap:
            buf = <int *>realloc(self._core.fds, n * sizeof(int))
            if buf == NULL:
                raise MemoryError()
            self._core.fds = buf
            buf = <int *>realloc(self._core.errs, n * sizeof(int))
            if buf == NULL:
                raise MemoryError()
            self._core.errs = buf
            self._core.cap = n
        for i in range(ndata):
            self._core.fds[i] = fds[i]
        for i in range(ndata, n):
            self._core.fds[i] = dirs[i - ndata]
        self._core.n = n
        self._core.ndata = ndata
        self._busy = True
        erq_store_release(&self._core.done, 0)
        erq_store_release(&self._core.pending, 1)
        erq_channel_post(self._core.wake[1])

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def collect(self, bint wait=False):
        """The errno of each descriptor of the finished job, in submit order (0 = synced), or
        None while it runs (or when there is none). ``wait``: block until it finishes."""
        cdef Py_ssize_t i
        self._check_open()
        if not self._busy:
            return None
        if wait:
            with nogil:
                erq_channel_wait(self._core.notify[0])
        if not erq_load_acquire(&self._core.done):
            return None  # nothing posted yet: the post follows done
        with nogil:
            erq_channel_take(self._core.notify[0])
        self._busy = False
        return [self._core.errs[i] for i in range(self._core.n)]

    @property
    def busy(self) -> bool:
        """A job was submitted and not yet collected."""
        return self._busy

    def close(self) -> None:
        """Finish the job in flight (its result is dropped), stop and join the thread, close
        both channels. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._busy = False
        self._shutdown()
