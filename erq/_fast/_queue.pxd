# C types for the compiled build of erq/_queue_py.py (linked here as _queue.py; see its
# docstring). The Python source is the behaviour; this file only makes its attributes struct
# fields and its hot methods C calls. (_ring is cimported as a module, c_ring: the source imports the
# names Item and Ring from the selectors; _clock, _item (new_item) and _append (the journal) likewise.)
cimport cython

cimport erq._fast._clock as _clock
cimport erq._fast._append as c_journal
cimport erq._fast._ring as c_ring
cimport erq._fast._ring as _item


cdef class ItemMemory:
    cdef public long long limit
    cdef public long long used


cdef class OpenRead:
    cdef public c_ring.Item item
    cdef public long long opened_at


cdef class Waiter:
    cdef public bint active
    cdef public bint peek
    cdef public bint reliable

    cpdef wake(self, c_ring.Item item)
    cpdef bint gone(self) except -1


cdef class Queue:
    cdef public object name
    cdef object _config
    cdef object _max_item_size  # the hot fields of _config (see the config setter)
    cdef object _max_age
    cdef long long _max_memory_size
    cdef bint _limited
    # The compiled queue runs on the compiled journal (the selectors choose both): its
    # per-request appends are C calls.
    cdef c_journal.AppendCore _journal
    cdef object _clock
    cdef object _on_expired
    cdef c_ring.Ring _ring
    cdef public long long _mem_bytes
    cdef ItemMemory _memory
    cdef public long long _disk_items
    cdef public long long _disk_bytes
    cdef dict _open
    cdef object _open_order
    cdef bint _timed_opens
    cdef long long _open_bytes
    cdef object _waiters
    cdef Py_ssize_t _dead_waiters
    cdef bint _serving
    cdef public long long next_id
    cdef public bint deleted
    cdef public long long created_at
    cdef public long long last_activity
    cdef public long long total_items
    cdef public long long expired_items
    cdef public long long discarded
    cdef public long long transactions
    cdef public long long canceled_transactions
    cdef public long long total_flushes
    cdef long long _last_removed_add_time
    cdef long long _rotations_seen
    cdef long long _item_overhead  # ITEM_OVERHEAD as a C integer
    cdef long long _pops  # the ring's lower id bound (see __init__)
    cdef long long _zone_end
    cdef unsigned long long _zone_min
    cdef unsigned long long _last_id
    cdef bint _spill_due
    cdef tuple _ticketed

    cpdef bint is_full(self)
    cdef long long _now(self) except? -1
    @cython.locals(item=c_ring.Item)
    cpdef tuple add(self, object data, object flags, long long expiry, long long now=*)
    @cython.locals(journal=c_journal.AppendCore, cost=cython.longlong)
    cdef object _append(self, c_ring.Item item)
    @cython.locals(limit=cython.longlong, budget=cython.longlong, shared=cython.longlong,
                   step=cython.longlong,
                   overhead=cython.longlong, first_max=cython.longlong, max_items=cython.longlong,
                   batch=list, item=c_ring.Item, n=cython.Py_ssize_t)
    cdef void _refill(self, bint ahead=*) except *
    @cython.locals(ring=c_ring.Ring)
    cdef void _push_tail(self, c_ring.Item item) except *
    @cython.locals(ring=c_ring.Ring)
    cdef void _push_head(self, c_ring.Item item) except *
    cdef unsigned long long _lowest_in_ring(self)
    cdef long long _mem_cost(self)
    @cython.locals(ring=c_ring.Ring, kept=cython.Py_ssize_t, i=cython.Py_ssize_t,
                   nbytes=cython.longlong)
    cdef void _spill(self) except *
    @cython.locals(cost=cython.longlong, n=cython.Py_ssize_t)
    cdef Py_ssize_t _items_within(self, list items, long long limit) except -1
    @cython.locals(item=c_ring.Item)
    cdef c_ring.Item _pop_head(self)
    @cython.locals(head=c_ring.Item, item=c_ring.Item, last_removed=cython.longlong)
    cpdef long long discard_expired(self, object now=*, object limit=*, bint sweep=*) except -1
    cdef bint _head_expired(self, long long now, bint sweep=*) except -1
    cpdef journal_removal(self, unsigned long long item_id)
    cpdef object head(self, long long now=*)
    cpdef object peek(self, long long now=*)
    @cython.locals(ring=c_ring.Ring, head=c_ring.Item, item=c_ring.Item,
                   journal=c_journal.AppendCore)
    cpdef object take(self, bint reliable, long long now=*)
    cpdef object sync_ticket(self)
    cpdef OpenRead open_read(self, long long item_id)
    cpdef bint is_open(self, OpenRead read)
    cpdef bint confirm(self, OpenRead read) except -1
    cpdef bint unremove(self, OpenRead read)
    cpdef long long unremove_all(self, list reads) except -1
    cdef bint _put_back(self, OpenRead read) except -1
    cdef void _forget_closed_reads(self) except *
    cpdef add_waiter(self, Waiter waiter)
    cpdef remove_waiter(self, Waiter waiter)
    cdef void _serve_waiters(self) except *
    @cython.locals(waiter=Waiter, item=c_ring.Item)
    cdef void _serve_waiters_now(self) except *
