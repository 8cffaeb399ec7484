# cython: language_level=3
"""The memcache port's client sockets on one epoll set (Linux; selector: erq.listener).

Under uvloop every readable client socket is its own libuv callback: the GIL taken and
dropped around it (a mutex and a condition variable each way), a bytes object, and the
Python-level call of ``data_received`` through a context run, about 1,900 instructions a
read before erq's own code starts, which at 50 connections was nearly a third of a request. Here the
client sockets sit in an epoll set of erq's own, whose descriptor is the only thing the
event loop watches: one loop callback serves every ready socket, each read is one ``recv``
into a shared buffer, and a reply is one ``send`` while nothing waits before it.

``Connection`` is the transport its protocol sees: ``write``, ``write_eof``, ``close``,
``abort``, ``is_closing``, ``pause_reading``/``resume_reading``, ``get_write_buffer_size``
and ``get_extra_info``, with asyncio's flow control (``pause_writing`` above 64 KiB unsent,
``resume_writing`` below 16 KiB), its closing rules (``close`` sends what is queued first;
``connection_lost`` runs in a later callback, once) and its half-close rule (``eof_received``
returning false closes). The pure-Python build, and any other platform, uses the event
loop's own transports (erq/_listener_py.py) instead.
"""

import errno as _errno
import logging
import os as _os
import socket as _socket

from erq.throttle import Throttle

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, ECONNRESET, EINTR, ENOTCONN, errno
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.unistd cimport close as c_close

cimport erq._fast._protocol as c_protocol
from erq._fast._wire cimport ReplyWriter
from erq._fast._wire cimport peer_gone as _fd_peer_gone


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd

    struct epoll_event:
        unsigned int events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *value, unsigned int size)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    enum:
        MSG_NOSIGNAL
        SHUT_WR


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    ssize_t sendmsg(int fd, const msghdr *msg, int flags)


cdef extern from "<errno.h>":
    int EWOULDBLOCK


log = logging.getLogger("erq.protocol")
# Out of descriptors, the retry each second would log a line each second.
_accept_failed = Throttle(log, logging.ERROR)

cdef int _IPPROTO_TCP = _socket.IPPROTO_TCP
cdef int _TCP_NODELAY = _socket.TCP_NODELAY

# A read's bytes object, made once and lent to every read that fits (see Hub._chunk): its
# length set to what recv took (lend.h).
cdef extern from "lend.h":
    void erq_lend_bytes(object bytes, Py_ssize_t size)

cdef extern from *:
    Py_ssize_t _refcount "Py_REFCNT"(object)

cdef enum:
    READ_SIZE = 256 * 1024  # bytes one recv may take (uvloop reads into a buffer of this size)
    # A read up to this size is handed to erq's protocol in the Hub's chunk, not copied: the
    # protocol keeps no read this small (it keeps a larger one's rest, PARSED_WHOLE, for the
    # loop's next pass), so the chunk is free again when data_received returns.
    LENT_MAX = 16 * 1024
    HIGH_WATER = 64 * 1024  # unsent bytes above which the protocol is told pause_writing
    LOW_WATER = 16 * 1024  # ... and below which, resume_writing
    MAX_EVENTS = 256  # ready sockets taken from the kernel per loop callback
    IOV_PIECES = 64  # queued replies handed to one sendmsg

LENT_READ_MAX = LENT_MAX  # for the tests: never more than the protocol's PARSED_WHOLE

_ACCEPT_ERRORS_PAUSE = (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM)


cdef class Hub:
    """The epoll set of one listener's client sockets and the loop callback that serves it."""

    cdef int _epfd
    cdef object _loop
    # What recv reads into: a bytes of READ_SIZE, lent as it is to erq's protocol for a small
    # read, where a copy cost an allocation, a copy and a free each read (~700 instructions
    # for a 1 KiB set, whose size glibc serves from its slowest bins). A chunk still held
    # when the protocol returns (by a traceback, or a protocol that keeps what it reads) is
    # left to its holders, and the next read makes another. Readable for the tests.
    cdef readonly bytes _chunk
    cdef set _conns  # open connections; the epoll set holds borrowed pointers to them
    cdef list _dead  # closed during this callback: kept alive until it returns
    cdef bint _watched

    def __cinit__(self, loop):
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        try:
            self._chunk = PyBytes_FromStringAndSize(NULL, READ_SIZE)
        except MemoryError:
            c_close(self._epfd)
            self._epfd = -1
            raise
        self._loop = loop
        self._conns = set()
        self._dead = []
        loop.add_reader(self._epfd, self._ready)
        self._watched = True

    def __dealloc__(self):
        if self._epfd >= 0:
            c_close(self._epfd)

    cdef Connection adopt(self, int fd, object peername, object sockname):
        cdef Connection conn = Connection.__new__(Connection)
        conn._fd = fd
        conn._hub = self
        conn._loop = self._loop
        conn._peername = peername
        conn._sockname = sockname
        conn._backlog = []
        self._conns.add(conn)
        return conn

    def _ready(self):
        """The loop's callback: the epoll set is readable, so some client socket is ready."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n = epoll_wait(self._epfd, events, MAX_EVENTS, 0)
        cdef int i
        cdef unsigned int ev
        cdef Connection conn
        for i in range(n):
            conn = <Connection>events[i].data.ptr  # a reference of our own from here on
            if conn._closed:
                continue
            ev = events[i].events
            if conn._reading:
                if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    conn.lone = n == 1  # nothing else to do while its client waits
                    conn._read(self)
                    conn.lone = False
            elif ev & (EPOLLERR | EPOLLHUP) and not conn._unsent:
                conn._fail(ECONNRESET)  # paused or half closed, nothing to send: gone
                continue
            elif ev & EPOLLRDHUP:
                conn._left_while_paused()
            if conn._unsent and not conn._closed and ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                conn._send_backlog()
        if self._dead:
            self._dead.clear()

    cdef _forget(self, Connection conn):
        self._conns.discard(conn)
        self._dead.append(conn)

    def close(self):
        """Abort every connection, stop watching and close the epoll set (the server has
        stopped): the loop's reader held the hub, and its descriptor, until the loop closed.
        A connection adopted after this fails at once (EBADF)."""
        for conn in list(self._conns):
            (<Connection>conn).abort()
        if self._watched:
            self._watched = False
            if not self._loop.is_closed():
                self._loop.remove_reader(self._epfd)
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1


@cython.final
cdef class Connection(ReplyWriter):
    """One client socket: the transport its protocol writes to and closes (a ReplyWriter: a
    compiled Session calls its ``write`` in C)."""

    cdef int _fd
    cdef Hub _hub
    cdef object _loop
    cdef public object protocol
    cdef c_protocol.MemcacheProtocol _memcache  # the protocol, when it is erq's: a C call
    cdef object _peername
    cdef object _sockname
    cdef list _backlog  # bytes not yet sent, in order; _offset of the first already sent
    cdef Py_ssize_t _offset
    cdef Py_ssize_t _unsent
    cdef unsigned int _events  # what the epoll set watches for
    cdef bint _in_set  # in the epoll set (from its adoption to its close)
    cdef bint _reading  # the protocol wants to read (not paused, not closing)
    cdef bint _input_ended  # the end of the stream was read (half closed)
    cdef bint _eof_wanted  # write_eof: shut the write side once what is queued is sent
    cdef bint _left_told  # the protocol heard the client leave while paused
    cdef bint _closing
    cdef bint _closed
    cdef bint _writing_paused

    # ---- the transport interface -------------------------------------------------------
    @property
    def writes_directly(self):
        """True: ``write`` is the system call itself, no writer needed in front of it."""
        return True

    cpdef write(self, object data):
        cdef Py_ssize_t size
        cdef ssize_t n
        if type(data) is not bytes:
            data = bytes(memoryview(data))  # a bytes-like object; an int is a TypeError
        size = PyBytes_GET_SIZE(data)
        if self._closing or self._closed or size == 0:
            return
        if not self._unsent:
            n = send(self._fd, PyBytes_AS_STRING(data), size, MSG_NOSIGNAL)
            if n == size:
                return
            if n < 0:
                if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                    self._fail(errno)
                    return
                n = 0
            self._backlog.append(data)
            self._offset = n
            self._unsent = size - n
            self._watch()
        else:
            self._backlog.append(data)
            self._unsent += size
        if not self._writing_paused and self._unsent > HIGH_WATER:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def writelines(self, lines):
        for data in lines:
            self.write(data)

    def can_write_eof(self):
        return True

    def write_eof(self):
        """Shut the write side (the client reads the end of the stream) once what is queued
        is sent; reading goes on. A write after it fails the connection (EPIPE)."""
        if self._closing or self._closed or self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._unsent:
            self._shut_write()

    def close(self):
        """Stop reading; send what is queued, then close and tell the protocol."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._reading = False
        if self._unsent:
            self._watch()
        else:
            self._finish(None)

    def abort(self):
        """Close now; whatever is queued is dropped."""
        self._finish(None)

    def is_closing(self):
        return self._closing or self._closed

    def peer_gone(self):
        """Closing, or the client is gone as far as the kernel knows (its reset may sit in
        the batch of events being served, after the one that brought an item for its get)."""
        return self._closing or self._closed or _fd_peer_gone(self._fd)

    def pause_reading(self):
        if self._closing or self._closed or not self._reading:
            return
        self._reading = False
        self._watch()

    def resume_reading(self):
        if self._closing or self._closed or self._reading:
            return
        self._reading = True
        self._left_told = False
        self._watch()

    def is_reading(self):
        return self._reading

    def get_write_buffer_size(self):
        return self._unsent

    def get_write_buffer_limits(self):
        return LOW_WATER, HIGH_WATER

    def set_socket_option(self, int level, int name, int value):
        """setsockopt(2) on the client's socket (erq.keepalive: there is no socket object)."""
        if self._closed:
            return
        if setsockopt(self._fd, level, name, &value, sizeof(int)) != 0:
            code = errno
            raise OSError(code, _os.strerror(code))

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        if name == "fileno":  # the socket's descriptor (erq.open_files), -1 once closed
            return self._fd
        return default

    # ---- inside ------------------------------------------------------------------------
    cdef _watch(self):
        """Make the epoll set watch for what is wanted now. While reading is paused the
        socket stays in the set: its errors and hang-ups (a reset: the client is gone) are
        reported whatever it watches for, and a client that shuts its side is heard
        (EPOLLRDHUP) once, so that a protocol waiting on it can act (``_left_while_paused``).
        A half-closed socket waits for nothing but those, so it cannot wake the loop again
        and again."""
        cdef unsigned int want = 0
        cdef epoll_event event
        cdef int op
        if self._reading:
            want |= EPOLLIN
        elif not self._closing and not self._input_ended and not self._left_told:
            want |= EPOLLRDHUP
        if self._unsent:
            want |= EPOLLOUT
        if self._in_set and want == self._events:
            return
        event.events = want
        event.data.ptr = <void *>self
        op = EPOLL_CTL_MOD if self._in_set else EPOLL_CTL_ADD
        if epoll_ctl(self._hub._epfd, op, self._fd, &event) < 0:
            self._fail(errno)
            return
        self._in_set = True
        self._events = want

    cdef _shut_write(self):
        if shutdown(self._fd, SHUT_WR) < 0 and errno != ENOTCONN:
            self._fail(errno)

    cdef _left_while_paused(self):
        """The client shut its side while reading was paused. erq's protocol may act on it
        now (a get waiting for an item ends, so the item does not go to a client that is
        gone); otherwise the end is read in its turn, once reading resumes."""
        self._left_told = True
        tell = getattr(self.protocol, "client_left_while_paused", None)
        if tell is not None:
            try:
                tell()
            except Exception as exc:
                self._protocol_failed("client_left_while_paused", exc)
                return
        if not self._closed:
            self._watch()

    cdef _read(self, Hub hub):
        cdef bytes chunk = hub._chunk
        cdef ssize_t n
        hub._chunk = None  # lent while the protocol runs
        if chunk is None or _refcount(chunk) != 1:  # held elsewhere: never written into
            chunk = PyBytes_FromStringAndSize(NULL, READ_SIZE)
        n = recv(self._fd, PyBytes_AS_STRING(chunk), READ_SIZE, 0)
        if n > 0:
            if n <= LENT_MAX and self._memcache is not None:
                erq_lend_bytes(chunk, n)
                data = chunk
            else:
                data = PyBytes_FromStringAndSize(PyBytes_AS_STRING(chunk), n)
            try:
                if self._memcache is not None:
                    self._memcache.data_received(data)
                else:
                    self.protocol.data_received(data)
            except Exception as exc:
                self._protocol_failed("data_received", exc)
            data = None
        if _refcount(chunk) == 1:  # this function's reference alone: free to lend again
            hub._chunk = chunk
        if n > 0:
            return
        if n == 0:
            self._end_of_stream()
        elif errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
            self._fail(errno)

    cdef _end_of_stream(self):
        try:
            keep_open = self.protocol.eof_received()
        except Exception as exc:
            self._protocol_failed("eof_received", exc)
            return
        if keep_open:
            self._reading = False  # half-closed: the client can still read our replies
            self._input_ended = True
            self._watch()
        else:
            self.close()

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef _send_backlog(self):
        cdef iovec iov[IOV_PIECES]
        cdef msghdr msg
        cdef list backlog = self._backlog
        cdef Py_ssize_t count = min(len(backlog), IOV_PIECES)
        cdef Py_ssize_t i
        cdef Py_ssize_t size
        cdef ssize_t n
        cdef bytes piece
        for i in range(count):
            piece = <bytes>backlog[i]
            iov[i].iov_base = PyBytes_AS_STRING(piece)
            iov[i].iov_len = PyBytes_GET_SIZE(piece)
        iov[0].iov_base = PyBytes_AS_STRING(<bytes>backlog[0]) + self._offset
        iov[0].iov_len -= self._offset
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = count
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        n = sendmsg(self._fd, &msg, MSG_NOSIGNAL)
        if n < 0:
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                self._fail(errno)
            return
        self._unsent -= n
        n += self._offset
        i = 0
        while i < count:
            size = PyBytes_GET_SIZE(<bytes>backlog[i])
            if n < size:
                break
            n -= size
            i += 1
        del backlog[:i]
        self._offset = n
        if self._writing_paused and self._unsent <= LOW_WATER:
            self._writing_paused = False
            self._call_protocol("resume_writing")
        if self._unsent:
            return
        if self._closing:
            self._finish(None)
            return
        if self._eof_wanted:
            self._shut_write()
        if not self._closed:
            self._watch()

    cdef _fail(self, int code):
        """A system call failed on the socket (a reset, a broken pipe): close it now."""
        if not self._closed:
            self._finish(OSError(code, _os.strerror(code)))  # ConnectionResetError for a reset

    cdef _protocol_failed(self, str method, exc):
        """As asyncio does: report to the loop's exception handler, then close at once."""
        self._loop.call_exception_handler(
            {
                "message": f"Fatal error: protocol.{method}() call failed.",
                "exception": exc,
                "transport": self,
                "protocol": self.protocol,
            }
        )
        self.abort()

    cdef _call_protocol(self, str method):
        try:
            getattr(self.protocol, method)()
        except Exception as exc:
            self._protocol_failed(method, exc)

    cdef _finish(self, exc):
        """Leave the epoll set, close the socket (dropping whatever is still queued: nothing,
        unless this is an abort or a failure), and tell the protocol in a later callback."""
        cdef epoll_event event
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._reading = False
        self._backlog.clear()
        self._offset = 0
        self._unsent = 0
        if self._in_set:
            epoll_ctl(self._hub._epfd, EPOLL_CTL_DEL, self._fd, &event)
            self._in_set = False
            self._events = 0
        c_close(self._fd)
        self._fd = -1
        self._hub._forget(self)
        if not self._loop.is_closed():
            self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc):
        protocol = self.protocol
        self.protocol = None  # the protocol holds this transport: break the cycle
        self._memcache = None
        if protocol is not None:
            protocol.connection_lost(exc)


cdef class Listener:
    """The listening sockets of the memcache port; what ``loop.create_server`` returns, as far
    as the server uses it (``sockets``, ``close``, ``wait_closed``)."""

    cdef object _loop
    cdef object _factory
    cdef int _backlog
    cdef bint _accepting
    cdef readonly Hub hub
    cdef readonly list sockets

    def __cinit__(self, loop, list sockets, factory, int backlog):
        self._loop = loop
        self._factory = factory
        self._backlog = backlog
        self.hub = Hub(loop)
        self.sockets = sockets
        self._accepting = True
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listening):
        cdef Connection conn
        cdef int fd, flags, one = 1
        cdef bint tcp = listening.family in (_socket.AF_INET, _socket.AF_INET6)  # once: an enum
        sockname = listening.getsockname()
        for _ in range(self._backlog):
            try:
                # The descriptor and the peer's address, close-on-exec as accept() makes it,
                # without the socket object accept() builds around it only for us to take the
                # descriptor back out (~8 us a client here).
                fd, peername = listening._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS_PAUSE:
                    # Out of descriptors or memory: asyncio's answer, pause accepting a second.
                    _accept_failed.log("cannot accept a client (%s); not accepting for 1 s", exc)
                    self._loop.remove_reader(listening.fileno())
                    self._loop.call_later(1.0, self._resume_accepting, listening)
                    return
                continue  # the client gave up before it was taken (ECONNABORTED, EPROTO, ...)
            if tcp:  # should the client be gone already, its first read tells
                setsockopt(fd, _IPPROTO_TCP, _TCP_NODELAY, &one, sizeof(one))
            flags = fcntl(fd, F_GETFL)
            if flags < 0 or fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0:
                _accept_failed.log(
                    "cannot make a client's socket non-blocking (%s); closed it",
                    _os.strerror(errno),
                )
                c_close(fd)
                continue
            try:
                conn = self.hub.adopt(fd, peername, sockname)
            except BaseException:  # MemoryError: the descriptor is nobody's yet
                c_close(fd)
                raise
            conn._reading = True
            conn._watch()
            if conn._closed:
                continue
            try:
                conn.protocol = protocol = self._factory()
                if type(protocol) is c_protocol.MemcacheProtocol:
                    conn._memcache = protocol
                protocol.connection_made(conn)
            except Exception as exc:
                conn._protocol_failed("connection_made", exc)

    def _resume_accepting(self, listening):
        if self._accepting:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def close(self):
        """Stop accepting and close the listening sockets; open connections stay open."""
        if not self._accepting:
            return
        self._accepting = False
        for sock in self.sockets:
            if not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self):
        """Nothing to wait for: ``close`` closed the sockets already."""

    def close_clients(self):
        """Abort every client connection still open and close their epoll set; accepting
        stops too (a client accepted later would have no epoll set to join)."""
        self.close()
        self.hub.close()


async def listen(loop, host, int port, factory, *, int backlog=1024):
    """Open the memcache port on every address of ``host`` (as ``loop.create_server`` does,
    with SO_REUSEADDR, IPv6 sockets IPv6-only); every client becomes ``factory()``."""
    infos = await loop.getaddrinfo(
        host, port, type=_socket.SOCK_STREAM, flags=_socket.AI_PASSIVE
    )
    sockets = []
    seen = set()
    try:
        for family, type_, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = _socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            if family == _socket.AF_INET6:
                sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Listener(loop, sockets, factory, backlog)
