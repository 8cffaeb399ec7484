# cython: language_level=3
"""memcache text-protocol request parser, C speed (twin of erq/_parser_py.py).

One ``feed()`` per received chunk turns the bytes into a batch of request tuples. Lines are
found with memchr, tokenised by pointer scanning and their numbers parsed in C; the only
Python objects made are the ones handed back (tokens, ints, data blocks, tuples), and a queue
name or key that repeats the previous one is handed back as the same bytes object.
A data block that is not complete in the chunk is filled in place as later chunks arrive: it
is allocated at what has come (at least ``FIRST_ROOM``, its whole size if smaller) and grows
(doubling, or to what has come if that is more) as its bytes arrive, so a client that declares
64 MiB and sends little holds little; the DataBudget counts that room (``next_room``, the same
in the pure twin).

Buffering invariant: the internal byte buffer ``_buf`` is non-empty only between feeds and
only while the state is ST_LINE (it then holds one unfinished line, no newline, shorter than
``max_line``) or ST_TRAILER (fewer than the two trailer bytes). A new chunk tops it up with
just enough bytes to finish that line or trailer, and the rest of the chunk is parsed in place,
so the common case (whole requests in one chunk) never copies the chunk.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize)
    Py_ssize_t _refcount "Py_REFCNT"(object)
from libc.string cimport memchr, memcmp, memcpy, memmove

import sys

REQ_SET = 1
REQ_GET = 2
REQ_CMD = 3
REQ_UNSUPPORTED = 4
REQ_ERROR = 5
REQ_BINARY = 6
# The data of a set refused for want of room in the DataBudget (its bytes were skipped).
NO_ROOM = False

cdef enum:
    K_SET = 1
    K_GET = 2
    K_CMD = 3
    K_UNSUPPORTED = 4
    K_ERROR = 5
    K_BINARY = 6

# The same values as Python objects, so building a request tuple is a plain reference.
cdef object O_SET = K_SET
cdef object O_GET = K_GET
cdef object O_CMD = K_CMD
cdef object O_UNSUPPORTED = K_UNSUPPORTED

# Parser states.
cdef enum:
    ST_LINE = 0     # expecting a request line
    ST_DATA = 1     # filling a data block that did not arrive in one piece
    ST_TRAILER = 2  # data block complete, waiting for its b"\r\n"
    ST_SKIP = 3     # discarding a data block (oversized, or no room for it) and its trailer

# Results of _line().
cdef enum:
    LINE_DONE = 0     # request emitted
    LINE_PENDING = 1  # storage command: a data block follows (_p_* fields set)
    LINE_CLOSED = 2   # closing error emitted

# Command-word classes.
cdef enum:
    W_OTHER = 0
    W_GET = 1
    W_GETS = 2
    W_SET = 3
    W_ADD = 4
    W_REPLACE = 5
    W_APPEND = 6
    W_PREPEND = 7
    W_CAS = 8
    W_MS = 9

cdef unsigned long long U32_MAX = 0xFFFFFFFF
cdef unsigned long long U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef unsigned long long I64_NEG_LIMIT = (<unsigned long long>1) << 63  # |INT64_MIN|
cdef unsigned long long I64_POS_LIMIT = ((<unsigned long long>1) << 63) - 1
cdef Py_ssize_t MAX_COUNT_DIGITS = 19
cdef Py_ssize_t BUF_KEEP = 16384  # an emptied buffer larger than this is freed
# The longest token kept for reuse (_reuse): a repeated token up to this long is handed on
# as the same object.
REUSED_TOKEN_MAX = 256
cdef Py_ssize_t REUSE_MAX = REUSED_TOKEN_MAX
# A data block still arriving is allocated at what has come, at least this (its whole size if
# smaller), and grows as its bytes come: a declared size is only a promise of the client's.
cdef enum:
    _FIRST_ROOM = 4096
FIRST_ROOM = _FIRST_ROOM


cdef inline Py_ssize_t _next_room(Py_ssize_t room, Py_ssize_t need, Py_ssize_t size) noexcept:
    if room >= size - room:  # twice the room reaches the size (without overflowing)
        return size
    room *= 2
    if room < need:
        room = need
    if room < _FIRST_ROOM:
        room = _FIRST_ROOM
    return size if room > size else room


def next_room(Py_ssize_t room, Py_ssize_t need, Py_ssize_t size):
    """The room of a block of ``size`` bytes that holds ``room`` and must take ``need``."""
    return _next_room(room, need, size)

cdef tuple _ERR_FORMAT = (K_ERROR, b"CLIENT_ERROR bad command line format\r\n", True)
cdef tuple _ERR_CHUNK = (K_ERROR, b"CLIENT_ERROR bad data chunk\r\n", True)
cdef tuple _ERR_TOO_LONG = (K_ERROR, b"CLIENT_ERROR line too long\r\n", True)
cdef tuple _BINARY = (K_BINARY,)
cdef bytes _EMPTY = b""
cdef bytes _W_ADD = b"add"
cdef bytes _W_REPLACE = b"replace"
cdef bytes _W_APPEND = b"append"
cdef bytes _W_PREPEND = b"prepend"
cdef bytes _W_CAS = b"cas"
cdef bytes _W_MS = b"ms"


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef inline bint _digits(const char* s, Py_ssize_t n, unsigned long long limit,
                         unsigned long long* out) noexcept:
    """Parse ASCII decimal digits only (no sign, no space, no '_'); False if empty or > limit.

    Up to 19 digits cannot overflow 64 bits, so they are checked against ``limit`` once, at
    the end: a check per digit divided by 10 each time (a division the compiler cannot turn
    into a multiplication, ``limit`` being a variable), ~30 cycles a digit."""
    cdef unsigned long long v = 0, d
    cdef Py_ssize_t i
    cdef unsigned char c
    if n == 0:
        return False
    for i in range(n):
        c = <unsigned char>s[i]
        if c < 48 or c > 57:
            return False
        d = c - 48
        if n > 19 and v > (limit - d) // 10:
            return False
        v = v * 10 + d
    if v > limit:
        return False
    out[0] = v
    return True


cdef inline object _flags(const char* s, Py_ssize_t n):
    cdef unsigned long long v
    if _digits(s, n, U32_MAX, &v):
        return v
    return None


cdef inline object _exptime(const char* s, Py_ssize_t n):
    cdef unsigned long long v
    if n > 0 and s[0] == c'-':
        if not _digits(s + 1, n - 1, I64_NEG_LIMIT, &v):
            return None
        if v == 0:
            return 0
        # -(v) without overflowing when v == 2**63
        return -(<long long>(v - 1)) - 1
    if _digits(s, n, I64_POS_LIMIT, &v):
        return <long long>v
    return None


cdef inline bint _is_noreply(const char* s, Py_ssize_t n) noexcept:
    return n == 7 and memcmp(s, b"noreply", 7) == 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline unsigned long long _fold(const char* s, Py_ssize_t n) noexcept:
    """Pack up to 8 bytes, each OR 0x20, into an integer: for words made of letters only,
    two words fold equal exactly when they are equal ignoring ASCII case."""
    cdef unsigned long long v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v |= (<unsigned long long>(<unsigned char>s[i] | 0x20)) << (8 * i)
    return v


cdef unsigned long long F_MS = _fold(b"ms", 2)
cdef unsigned long long F_GET = _fold(b"get", 3)
cdef unsigned long long F_SET = _fold(b"set", 3)
cdef unsigned long long F_ADD = _fold(b"add", 3)
cdef unsigned long long F_CAS = _fold(b"cas", 3)
cdef unsigned long long F_GETS = _fold(b"gets", 4)
cdef unsigned long long F_APPEND = _fold(b"append", 6)
cdef unsigned long long F_REPLACE = _fold(b"replace", 7)
cdef unsigned long long F_PREPEND = _fold(b"prepend", 7)


cdef int _classify(const char* s, Py_ssize_t n) noexcept:
    """Which command word ``s`` is, case-insensitively (only words of interest to the parser)."""
    cdef unsigned long long v
    if n < 2 or n > 7:
        return W_OTHER
    v = _fold(s, n)
    if n == 2:
        if v == F_MS:
            return W_MS
    elif n == 3:
        if v == F_GET:
            return W_GET
        if v == F_SET:
            return W_SET
        if v == F_ADD:
            return W_ADD
        if v == F_CAS:
            return W_CAS
    elif n == 4:
        if v == F_GETS:
            return W_GETS
    elif n == 6:
        if v == F_APPEND:
            return W_APPEND
    elif n == 7:
        if v == F_REPLACE:
            return W_REPLACE
        if v == F_PREPEND:
            return W_PREPEND
    return W_OTHER


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bytes _lower(const char* s, Py_ssize_t n):
    """ASCII-lowercased copy, as bytes.lower() does."""
    cdef bytes b = PyBytes_FromStringAndSize(NULL, n)
    cdef char* d = PyBytes_AS_STRING(b)
    cdef Py_ssize_t i
    cdef char c
    for i in range(n):
        c = s[i]
        if c >= c'A' and c <= c'Z':
            c = c + 32
        d[i] = c
    return b


cdef inline Py_ssize_t _token_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Where the token starting at s[i] (not a space) ends: the next space, or n."""
    i += 1
    while i < n and s[i] != c' ':
        i += 1
    return i


cdef inline bytes _reuse(bytes last, const char* s, Py_ssize_t n):
    """``last`` if it holds exactly s[0:n], else a new bytes object.

    Pipelined requests usually name the same queue over and over; handing back the same
    object saves an allocation here and a hash (cached on the object) in the command layer.
    """
    if (last is not None and PyBytes_GET_SIZE(last) == n
            and memcmp(PyBytes_AS_STRING(last), s, n) == 0):
        return last
    return PyBytes_FromStringAndSize(s, n)


@cython.final
cdef class DataBudget:
    """The data that storage requests still arriving may hold, over every connection of a
    server (``max_pending_data``). A request whose data does not come whole in one read holds
    the room its data takes as it arrives (``next_room``), until the last byte is in: the
    memory a client can make the server hold is what it has sent, not what it says it will
    send. A request whose next bytes find no room drops what it holds and is skipped to its
    end, and a set is refused (``NO_ROOM``: ``SERVER_ERROR out of memory storing object``,
    memcached's reply when it has no memory for an item). A request whose room is the only
    room held always gets more, so any item up to ``max_item_size`` can come through alone."""

    def __init__(self, Py_ssize_t limit):
        self.limit = limit
        self.held = 0  # bytes held for requests whose data is arriving
        self.refused = 0  # requests refused for want of room

    def take(self, Py_ssize_t size, Py_ssize_t holding=0):
        """Hold ``size`` more bytes for a request's data that holds ``holding`` already, if
        they fit or nothing else is held (a refusal is counted)."""
        return self._take(size, holding)

    def give(self, Py_ssize_t size):
        """The data ``take`` or ``hold`` held for is in, or will never come."""
        self.held -= size

    def hold(self, Py_ssize_t size):
        """Count ``size`` bytes already in memory, room or not (a set's data that waits a
        pass of the loop: it cannot be refused for the server's own pause)."""
        self.held += size

    cdef bint _take(self, Py_ssize_t size, Py_ssize_t holding) noexcept:
        if self.held != holding and self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        return True


# no_gc_clear: the collector must not set _budget to None before __dealloc__ gives the room
# back (a parser dropped mid-set inside a garbage cycle would write through None). A parser
# refers to nothing that can refer back to it, so it closes no cycle itself.
@cython.final
@cython.no_gc_clear
cdef class Parser:
    """Stateful memcache text-protocol parser: bytes in, request tuples out. With a
    ``budget`` (a DataBudget shared by a server's connections), a data block that does not
    arrive in one piece is read only if the budget has room for it."""

    # Fields and C methods: declared in _parser.pxd (the compiled protocol cimports it).

    def __cinit__(self):
        self._buf = NULL
        self._buflen = 0
        self._bufcap = 0
        self._state = ST_LINE
        self._closed = False
        self._no_room = False
        self._held = 0

    def __init__(self, max_line=65536, max_item_size=64 * 1024 * 1024,
                 DataBudget budget=None):
        self.set_limits(max_line, max_item_size)
        self._budget = budget

    def set_limits(self, max_line, max_item_size):
        """The longest line and the largest data block from the next request line on (a
        reload changes them on open connections); a block already being read keeps the limit
        its line was checked against."""
        max_line = max_line.__index__()
        max_item_size = max_item_size.__index__()
        if not 1 <= max_line <= sys.maxsize:
            raise ValueError(f"max_line must be between 1 and {sys.maxsize}")
        if not 0 <= max_item_size <= sys.maxsize:
            raise ValueError(f"max_item_size must be between 0 and {sys.maxsize}")
        self._max_line = max_line
        self._max_item = max_item_size

    def __dealloc__(self):
        self._give_back()
        PyMem_Free(self._buf)
        self._buf = NULL

    def discard(self):
        """The connection is gone: take no more input, and give back what the data block
        being read holds in the budget."""
        self._closed = True
        self._state = ST_LINE
        self._release()
        self._buflen = 0
        PyMem_Free(self._buf)
        self._buf = NULL
        self._bufcap = 0

    @property
    def buffered(self):
        """Bytes held waiting for more input (skipped bytes are never held)."""
        cdef Py_ssize_t held = self._buflen
        if self._state == ST_DATA:
            held += self._p_filled
        elif self._state == ST_TRAILER:
            held += PyBytes_GET_SIZE(self._p_block)
        return held

    @property
    def closed(self):
        """True once a closing error (or REQ_BINARY) was returned; input is then ignored."""
        return self._closed

    cpdef list feed(self, object data, Py_ssize_t start=0, Py_ssize_t limit=0):
        """Consume one received chunk, from ``start``; return every request it completed, in
        order. With a ``limit``, stop before the next request line once that many are
        complete, a get counting one per key (``extra_keys`` says how many more than the
        requests that makes): ``stopped_at`` then says where, and the bytes from there on
        are neither parsed nor kept (feed them again). Otherwise ``stopped_at`` is
        ``len(data)``.

        The list is the last feed's again when its caller emptied it and holds it no more
        (the protocol empties it once the requests ran): a list made and freed per read, and
        its slot array, were ~150 instructions of every request."""
        cdef list out = self._out  # this reference and the parser's, when no one else holds it
        cdef const char* p
        cdef const char* nl
        cdef Py_ssize_t n, pos = start, take, used
        if out is None or _refcount(out) != 2 or PyList_GET_SIZE(out):
            out = []
            self._out = out
        self.extra_keys = 0
        if self._closed:
            self.stopped_at = len(data)
            return out
        if type(data) is not bytes:
            data = bytes(data)
        p = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
        self.stopped_at = n
        if start < 0 or start > n:
            raise ValueError(f"start {start} is outside the data ({n} bytes)")
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        while self._buflen and pos < n:
            # Finish the buffered line / trailer with just enough of the new chunk.
            if self._state == ST_TRAILER:
                take = 2 - self._buflen
                if take > n - pos:
                    take = n - pos
                self._append(p + pos, take)
                pos += take
            else:
                take = self._max_line - self._buflen
                if take < 0:
                    take = 0  # a reload lowered max_line below the buffered line: too long
                if take > n - pos:
                    take = n - pos
                nl = <const char*>memchr(p + pos, c'\n', take)
                if nl != NULL:
                    take = nl - (p + pos) + 1
                self._append(p + pos, take)
                pos += take
                if nl == NULL and self._buflen < self._max_line:
                    return out  # still one unfinished line, and all of data is in it
            used = self._run(self._buf, self._buflen, out, 0)
            if self._closed:
                return out
            if used < self._buflen:
                memmove(self._buf, self._buf + used, self._buflen - used)
            self._buflen -= used
            if self._buflen == 0 and self._bufcap > BUF_KEEP:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._bufcap = 0
        if pos < n:
            pos += self._run(p + pos, n - pos, out, limit)
            if not self._closed and pos < n:
                if limit and len(out) + self.extra_keys >= limit and self._state == ST_LINE:
                    self.stopped_at = pos
                    return out
                self._append(p + pos, n - pos)
        return out

    cdef int _append(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self._buflen + n
        cdef Py_ssize_t cap
        cdef char* nb
        if need > self._bufcap:
            cap = self._bufcap * 2 if self._bufcap else 256
            while cap < need:
                cap *= 2
            nb = <char*>PyMem_Realloc(self._buf, cap)
            if nb == NULL:
                raise MemoryError()
            self._buf = nb
            self._bufcap = cap
        memcpy(self._buf + self._buflen, p, n)
        self._buflen = need
        return 0

    cdef int _close(self, list out, tuple reply) except -1:
        # The closing reply is always the last element of out: callers return right after.
        out.append(reply)
        self.discard()
        return 0

    cdef void _give_back(self):
        if self._held and self._budget is not None:
            self._budget.held -= self._held
        self._held = 0

    cdef void _release(self):
        self._give_back()
        self._p_word = None
        self._p_name = None
        self._p_flags = None
        self._p_exptime = None
        self._p_block = None
        self._p_filled = 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef list _tokens(self, const char* s, Py_ssize_t i, Py_ssize_t n):
        """The space-separated tokens of s[i:n] (runs of spaces count as one separator)."""
        cdef list r = []
        cdef Py_ssize_t end
        while True:
            while i < n and s[i] == c' ':
                i += 1
            if i >= n:
                return r
            end = _token_end(s, i, n)
            r.append(self._token(s + i, end - i))
            i = end

    cdef inline bytes _token(self, const char* s, Py_ssize_t n):
        """s[0:n] as bytes: the last token again when it holds the same (up to REUSE_MAX)."""
        if n > REUSE_MAX:
            return PyBytes_FromStringAndSize(s, n)
        self._last_token = _reuse(self._last_token, s, n)
        return self._last_token

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef tuple _keys(self, const char* s, Py_ssize_t i, Py_ssize_t n):
        """The keys of a get, s[i:n], as a tuple: counted first, then made at their number
        (one allocation, from a free list for a few keys), where a list grown key by key
        took two and a reallocation. A client's gets mostly repeat one key: the tuple of the
        last one-key line is handed back again when its key is the same."""
        cdef Py_ssize_t count = 0, at = i, k, end
        cdef tuple keys
        cdef bytes tok
        while True:
            while at < n and s[at] == c' ':
                at += 1
            if at >= n:
                break
            count += 1
            at = _token_end(s, at, n)
        if count == 1:
            while s[i] == c' ':
                i += 1
            end = _token_end(s, i, n)
            tok = self._token(s + i, end - i)
            if end - i > REUSE_MAX:  # not kept: a long key would be held as long as the parser
                return (tok,)
            if self._last_keys is None or <bytes>self._last_keys[0] is not tok:
                self._last_keys = (tok,)
            return self._last_keys
        keys = PyTuple_New(count)
        for k in range(count):
            while s[i] == c' ':
                i += 1
            end = _token_end(s, i, n)
            tok = self._token(s + i, end - i)
            Py_INCREF(tok)  # PyTuple_SET_ITEM takes the reference
            PyTuple_SET_ITEM(keys, k, tok)
            i = end
        return keys

    cdef int _emit(self, list out, object data) except -1:
        if self._p_kind == K_SET:
            out.append((O_SET, self._p_name, self._p_flags, self._p_exptime, data,
                        self._p_noreply))
        else:
            out.append((O_UNSUPPORTED, self._p_word, self._p_noreply))
        # Only the block can be large; the small _p_* references are overwritten by the next
        # storage line.
        self._p_block = None
        self._p_filled = 0
        self._state = ST_LINE
        return 0

    cdef int _grow_block(self, Py_ssize_t room) except -1:
        """Make the block being filled hold ``room`` bytes (``_next_room``). The block is
        referenced by the parser alone, so it is resized in place."""
        cdef PyObject* raw = <PyObject*>self._p_block
        Py_INCREF(<object>raw)
        self._p_block = None  # the reference taken above is now the only one
        if _PyBytes_Resize(&raw, room) < 0:
            # raw was freed and MemoryError set; the connection is dropped with it, and the
            # parser takes nothing more.
            self._closed = True
            self._state = ST_LINE
            self._release()
            return -1
        self._p_block = <bytes>raw
        Py_DECREF(<object>raw)
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _run(self, const char* p, Py_ssize_t n, list out, Py_ssize_t limit) except -1:
        """Parse p[0:n]; return how many bytes were consumed (the rest must be kept; with a
        ``limit``, the rest from the next request line once ``out`` holds that many)."""
        cdef Py_ssize_t pos = 0, avail, lim, linelen, end, take, size, room
        cdef const char* nl
        cdef int r
        while pos < n:
            if self._state == ST_LINE:
                if limit and len(out) + self.extra_keys >= limit:
                    return pos
                if <unsigned char>p[pos] == 0x80:
                    self._close(out, _BINARY)
                    return n
                avail = n - pos
                lim = avail if avail < self._max_line else self._max_line
                nl = <const char*>memchr(p + pos, c'\n', lim)
                if nl == NULL:
                    if avail >= self._max_line:
                        self._close(out, _ERR_TOO_LONG)
                        return n
                    return pos
                linelen = nl - (p + pos)
                end = linelen
                if end > 0 and p[pos + end - 1] == c'\r':
                    end -= 1
                r = self._line(p + pos, end, out)
                pos += linelen + 1
                if r == LINE_CLOSED:
                    return n
                if r == LINE_PENDING:
                    if self._p_count > self._max_item:
                        self._skip_left = self._p_count + 2
                        self._state = ST_SKIP
                    else:
                        size = <Py_ssize_t>self._p_count
                        if n - pos >= size:
                            self._p_block = PyBytes_FromStringAndSize(p + pos, size)
                            pos += size
                            self._state = ST_TRAILER
                        else:
                            take = n - pos
                            room = _next_room(0, take, size)
                            if self._budget is not None and not self._budget._take(room, 0):
                                self._no_room = True
                                self._skip_left = self._p_count + 2
                                self._state = ST_SKIP
                                continue
                            if self._budget is not None:
                                self._held = room
                            # Filled in place as it arrives, one copy per byte; it grows as
                            # more comes (_grow_block).
                            self._p_size = size
                            self._p_block = PyBytes_FromStringAndSize(NULL, room)
                            memcpy(PyBytes_AS_STRING(self._p_block), p + pos, take)
                            self._p_filled = take
                            pos = n
                            self._state = ST_DATA
            elif self._state == ST_TRAILER:
                if n - pos < 2:
                    return pos
                if p[pos] != c'\r' or p[pos + 1] != c'\n':
                    self._close(out, _ERR_CHUNK)
                    return n
                pos += 2
                self._emit(out, self._p_block)
            elif self._state == ST_DATA:
                size = self._p_size
                take = size - self._p_filled
                if take > n - pos:
                    take = n - pos
                if self._p_filled + take > PyBytes_GET_SIZE(self._p_block):
                    room = _next_room(PyBytes_GET_SIZE(self._p_block), self._p_filled + take, size)
                    if self._budget is not None:
                        if not self._budget._take(room - self._held, self._held):
                            # No room for more: what came is dropped, the rest skipped.
                            self._give_back()
                            self._p_block = None
                            self._no_room = True
                            self._skip_left = <unsigned long long>(size - self._p_filled) + 2
                            self._state = ST_SKIP
                            continue
                        self._held = room
                    self._grow_block(room)
                memcpy(PyBytes_AS_STRING(self._p_block) + self._p_filled, p + pos, take)
                self._p_filled += take
                pos += take
                if self._p_filled == size:
                    self._give_back()
                    self._state = ST_TRAILER
            else:  # ST_SKIP
                avail = n - pos
                if <unsigned long long>avail < self._skip_left:
                    self._skip_left -= <unsigned long long>avail
                    return n
                pos += <Py_ssize_t>self._skip_left
                self._skip_left = 0
                if self._no_room:
                    self._no_room = False
                    self._emit(out, NO_ROOM)
                else:
                    self._emit(out, None)
        return pos

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _line(self, const char* s, Py_ssize_t n, list out) except -1:
        """Handle one request line s[0:n] (terminator already removed)."""
        cdef Py_ssize_t i = 0, ws, wl, end, nargs, k, at
        cdef Py_ssize_t ts[6]
        cdef Py_ssize_t tl[6]
        cdef int kind
        cdef unsigned long long count = 0
        cdef tuple keys
        while i < n and s[i] == c' ':
            i += 1
        if i == n:
            out.append((O_CMD, _EMPTY, []))
            return LINE_DONE
        ws = i
        while i < n and s[i] != c' ':
            i += 1
        wl = i - ws
        kind = _classify(s + ws, wl)
        if kind == W_OTHER:
            out.append((O_CMD, _lower(s + ws, wl), self._tokens(s, i, n)))
            return LINE_DONE
        if kind == W_GETS:
            keys = self._keys(s, i, n)
            if PyTuple_GET_SIZE(keys) > 1:
                self.extra_keys += PyTuple_GET_SIZE(keys) - 1
            out.append((O_GET, keys, True))
            return LINE_DONE
        if kind == W_GET:
            keys = self._keys(s, i, n)
            if PyTuple_GET_SIZE(keys) > 1:
                self.extra_keys += PyTuple_GET_SIZE(keys) - 1
            # A repeated one-key get is the same request: its tuple is handed back again.
            if self._last_get is None or <tuple>self._last_get[1] is not keys:
                self._last_get = (O_GET, keys, False)
            out.append(self._last_get)
            return LINE_DONE
        # Storage command: only the first six arguments matter, and whether there are more.
        nargs = 0
        while nargs <= 6:
            while i < n and s[i] == c' ':
                i += 1
            if i >= n:
                break
            end = i + 1
            while end < n and s[end] != c' ':
                end += 1
            if nargs < 6:
                ts[nargs] = i
                tl[nargs] = end - i
            nargs += 1
            i = end
        # The byte count's argument: memcached's meta set (ms <key> <datalen> <flags>*) has a
        # data block too, which must be skipped, not run as requests.
        at = 1 if kind == W_MS else 3
        if nargs > at:  # leading zeros are no reason to refuse
            while tl[at] > 1 and s[ts[at]] == c'0':
                ts[at] += 1
                tl[at] -= 1
        if (nargs <= at or tl[at] > MAX_COUNT_DIGITS
                or not _digits(s + ts[at], tl[at], U64_MAX, &count)):
            self._close(out, _ERR_FORMAT)
            return LINE_CLOSED
        self._p_count = count
        if kind == W_SET:
            self._p_kind = K_SET
            if tl[0] <= REUSE_MAX:
                self._last_name = _reuse(self._last_name, s + ts[0], tl[0])
                self._p_name = self._last_name
            else:
                self._p_name = PyBytes_FromStringAndSize(s + ts[0], tl[0])
            if nargs > 5:
                self._p_flags = None
                self._p_exptime = None
            else:
                self._p_flags = _flags(s + ts[1], tl[1])
                self._p_exptime = _exptime(s + ts[2], tl[2])
            # noreply only as the last argument: a line with more is malformed, answered.
            self._p_noreply = nargs == 5 and _is_noreply(s + ts[4], tl[4])
            return LINE_PENDING
        self._p_kind = K_UNSUPPORTED
        if kind == W_ADD:
            self._p_word = _W_ADD
        elif kind == W_REPLACE:
            self._p_word = _W_REPLACE
        elif kind == W_APPEND:
            self._p_word = _W_APPEND
        elif kind == W_PREPEND:
            self._p_word = _W_PREPEND
        elif kind == W_MS:
            self._p_word = _W_MS
            self._p_noreply = False  # its quiet flag (q) still lets errors through
            return LINE_PENDING
        else:
            self._p_word = _W_CAS
        k = 5 if kind == W_CAS else 4  # index of the optional noreply argument
        self._p_noreply = nargs > k and _is_noreply(s + ts[k], tl[k])
        return LINE_PENDING
