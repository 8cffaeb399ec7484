"""The named commands besides ``get`` and ``set`` (PROTOCOL.md §3, §4, §8): queue administration
(``delete``, ``flush``, ...), the server's own (``stats``, ``status``, ``reload``, ...) and the
table ``COMMANDS`` through which the request dispatcher (``erq.commands``) finds each, with
``monitor`` and ``confirm`` (``erq.monitor``).

None is on the per-request hot path: plain Python in both builds, called from the compiled
dispatcher. Replies are appended to ``session.out``, as every command does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from erq import __version__
from erq._compat import IMPLEMENTATION
from erq.journal_api import JournalError
from erq.monitor import cmd_confirm, cmd_monitor
from erq.names import valid_queue_name
from erq.queue import EXPIRY_BATCH
from erq.replies import (
    BAD_FORMAT,
    BAD_NAME,
    DELETED,
    END,
    JOURNAL_FAILED_LOG,
    NOT_SUPPORTED,
    READ_ONLY,
    journal_failed,
)
from erq.sliced import (
    LongText,
    Work,
    answer_in_slices,
    each_found,
    each_queue_stats,
    in_slices,
)
from erq.throttle import Throttle

if TYPE_CHECKING:
    from erq.queues import QueueCollection
    from erq.session import Session
    from erq.state import ServerState

log = logging.getLogger("erq.commands")
# Any client may ask for a status: a save that fails (a full or read-only disk) is logged once
# per 10 s, not per request.
_status_unsaved = Throttle(log, logging.ERROR)


# ---- queue administration ---------------------------------------------------------------
def _noreply(args: list[bytes], named: bool = False) -> tuple[list[bytes], bool]:
    """``args`` without a trailing ``noreply``, and whether there was one. For a command that
    names a queue, only after the name: ``delete noreply`` deletes the queue "noreply", as
    memcached reads it."""
    if len(args) > named and args[-1] == b"noreply":
        return args[:-1], True
    return args, False


def _one_name(session: Session, args: list[bytes], noreply: bool = False) -> str | None:
    """The one queue name of ``args``, or None with the error answered (unless noreply:
    PROTOCOL §10, a client that sent it reads no reply)."""
    if len(args) != 1:
        if not noreply:
            session.out.append(BAD_FORMAT)
        return None
    if not valid_queue_name(args[0]):
        if not noreply:
            session.out.append(BAD_NAME)
        return None
    return args[0].decode("ascii")


def _named_write(
    command: str,
    session: Session,
    args: list[bytes],
    apply: Callable[[str], None],
    reply: bytes,
) -> None:
    """``delete``/``flush q [noreply]``: validate, refuse unless UP, apply, reply."""
    args, noreply = _noreply(args, named=True)
    name = _one_name(session, args, noreply)
    if name is None:
        return
    if not session.state.up:
        if not noreply:
            session.out.append(READ_ONLY)
        return
    try:
        apply(name)
    except JournalError as exc:
        _refused(session, f"{command} {name}", exc, noreply)
        return
    if not noreply:
        session.out.append(reply)


def _refused(session: Session, what: str, exc: JournalError, noreply: bool = False) -> None:
    """A command whose journal record could not be written (disk full, say): SERVER_ERROR,
    as for a set, and the connection goes on."""
    reply = _refusal(what, exc)
    if not noreply:
        session.out.append(reply)


def _refusal(what: str, exc: JournalError) -> bytes:
    JOURNAL_FAILED_LOG.log("%s: %s", what, exc)
    return journal_failed(exc)


def cmd_delete(session: Session, args: list[bytes]) -> None:
    if len(args) > 1 and args[1] == b"0":
        # memcached's "delete <key> 0 [noreply]": the old hold time, accepted only as 0
        # (python-memcached's delete_multi(time=0) sends it).
        args = [args[0], *args[2:]]
    _named_write("delete", session, args, session.state.queues.delete, DELETED)


def cmd_flush(session: Session, args: list[bytes]) -> None:
    def flush(name: str) -> None:
        session.wait_for_sync(session.state.queues.flush(name))

    _named_write("flush", session, args, flush, END)


def cmd_flush_all(session: Session, args: list[bytes]) -> None:
    args, noreply = _noreply(args)
    if len(args) > 1 or (
        args and not (args[0].isdigit() or args[0][:1] == b"-" and args[0][1:].isdigit())
    ):
        if not noreply:
            session.out.append(BAD_FORMAT)
        return
    state = session.state
    if not state.up:
        if not noreply:
            session.out.append(READ_ONLY)
        return
    try:
        session.wait_for_sync(state.queues.flush_all())
    except JournalError as exc:
        _refused(session, "flush_all", exc, noreply)
        return
    if not noreply:
        session.out.append(b"Flushed all queues.\r\n" if state.kestrel else b"OK\r\n")


def cmd_flush_expired(session: Session, args: list[bytes]) -> None:
    name = _one_name(session, args)
    if name is None:
        return
    if not session.state.up:
        session.out.append(READ_ONLY)
        return
    answer_in_slices(session, _flush_expired(session.state.queues, [name], f"flush_expired {name}"))


def cmd_flush_all_expired(session: Session, args: list[bytes]) -> None:
    state = session.state
    if args:
        session.out.append(BAD_FORMAT)
        return
    if not state.up:
        session.out.append(READ_ONLY)
        return
    answer_in_slices(
        session, _flush_expired(state.queues, state.queues.names(), "flush_all_expired")
    )


def _expired_batches(queues: QueueCollection, names: list[str]) -> Iterator[int | JournalError]:
    """Remove the expired items at the head of each queue of ``names``, EXPIRY_BATCH at a
    time: each batch's count, or the JournalError that ends a queue's (the item it could not
    journal, and those after it, stay). A queue deleted meanwhile has nothing left to expire."""
    for name in names:
        while True:
            try:
                removed = queues.flush_expired(name, EXPIRY_BATCH)
            except JournalError as exc:
                yield exc
                break
            yield removed
            if removed < EXPIRY_BATCH:
                break


def _flush_expired(queues: QueueCollection, names: list[str], what: str) -> Work:
    """``flush_expired``'s work, in slices: the number of items removed, or SERVER_ERROR if a
    queue's journal refused a removal (the other queues are done all the same)."""
    count = 0
    failed = None
    for step in in_slices(_expired_batches(queues, names)):
        if step is None:
            yield
        elif isinstance(step, JournalError):
            failed = failed or step
        else:
            count += step
    if failed is not None:
        return _refusal(what, failed)
    return b"%d\r\n" % count


# ---- server commands ---------------------------------------------------------------------
def cmd_version(session: Session, args: list[bytes]) -> None:
    session.out.append(b"VERSION %s\r\n" % __version__.encode())


def general_stats(state: ServerState) -> list[tuple[str, object]]:
    """The server-wide fields of ``stats`` (PROTOCOL.md §8), in order: the one list that the
    memcache ``stats`` command and the admin port's /stats.json and /metrics all read."""
    c = state.counters
    queues = state.queues
    now = time.time()
    return [
        ("pid", os.getpid()),
        ("uptime", int(now - state.started)),
        ("time", int(now)),
        ("version", __version__),
        ("implementation", IMPLEMENTATION),
        ("curr_connections", c.curr_connections),
        ("total_connections", c.total_connections),
        ("rejected_connections", c.rejected_connections),
        ("pending_data_bytes", state.data_budget.held),
        ("pending_data_refusals", state.data_budget.refused),
        ("cmd_get", c.cmd_get),
        ("cmd_set", c.cmd_set),
        ("cmd_peek", c.cmd_peek),
        ("get_hits", c.get_hits),
        ("get_misses", c.get_misses),
        ("bytes_read", c.bytes_read),
        ("bytes_written", c.bytes_written),
        ("curr_items", queues.curr_items()),
        ("total_items", queues.total_items),
        ("bytes", queues.curr_bytes()),
        ("item_memory", queues.memory.used),
        ("limit_maxbytes", queues.memory.limit),
        ("queue_creates", queues.queue_creates),
        ("queue_deletes", queues.queue_deletes),
        ("queue_expires", queues.queue_expires),
        ("status", state.status),
    ]


# The general fields that count events since the start (the others are gauges), by where
# each is kept: /metrics exports them as counters, and ``stats reset`` zeroes them, as
# memcached's does (the gauges, such as curr_connections and curr_items, and each queue's own
# fields stay as they are).
_REQUEST_COUNTS = (
    "cmd_get",
    "cmd_set",
    "cmd_peek",
    "get_hits",
    "get_misses",
    "bytes_read",
    "bytes_written",
    "total_connections",
    "rejected_connections",
)
_QUEUE_COUNTS = ("total_items", "queue_creates", "queue_deletes", "queue_expires")
GENERAL_COUNTERS = frozenset((*_REQUEST_COUNTS, *_QUEUE_COUNTS, "pending_data_refusals"))


def cmd_stats(session: Session, args: list[bytes]) -> None:
    if args == [b"reset"]:
        state = session.state
        for name in _REQUEST_COUNTS:
            setattr(state.counters, name, 0)
        for name in _QUEUE_COUNTS:
            setattr(state.queues, name, 0)
        state.data_budget.refused = 0  # pending_data_refusals
        session.out.append(b"RESET\r\n")
        return
    if args:
        session.out.append(END)  # memcached's sub-statistics do not exist for a queue server
        return
    answer_in_slices(session, _stats(session.state))


def _stats(state: ServerState) -> Work:
    """``stats``' reply, its queues' lines gathered in slices (a queue deleted meanwhile is
    left out)."""
    text = LongText()
    for k, v in general_stats(state):
        text.append(b"STAT %s %s\r\n" % (k.encode(), str(v).encode()))
    for entry in each_queue_stats(state.queues):
        if entry is None:
            yield text.part()  # sent now: a reply nobody reads is not held whole
            continue
        name, stats = entry
        for field, value in stats.items():
            text.append(
                b"STAT queue_%s_%s %s\r\n" % (name.encode(), field.encode(), str(value).encode())
            )
    text.append(END)
    return text.part()


def _dump(session: Session, args: list[bytes], fields: Callable[[str], Any]) -> None:
    for arg in args:
        if not valid_queue_name(arg):
            session.out.append(BAD_NAME)
            return
    queues = session.state.queues
    names = [a.decode("ascii") for a in args] if args else queues.names()
    answer_in_slices(session, _dump_blocks(names, fields))


def _dump_blocks(names: list[str], fields: Callable[[str], Any]) -> Work:
    """``dump_*``'s reply, a block per queue of ``names`` that exists (``fields`` gives None
    for one that does not, or was deleted meanwhile), in slices."""
    text = LongText()
    for entry in each_found(names, fields):
        if entry is None:
            yield text.part()  # sent now: a reply nobody reads is not held whole
            continue
        name, found = entry
        text.append(b"queue '%s' {\r\n" % name.encode())
        for field, value in found:
            text.append(b"  %s=%s\r\n" % (field.encode(), str(value).encode()))
        text.append(b"}\r\n")
    text.append(END)
    return text.part()


def cmd_dump_stats(session: Session, args: list[bytes]) -> None:
    queues = session.state.queues

    def fields(name: str) -> Any:
        stats = queues.queue_stats(name)
        return stats.items() if stats is not None else None

    _dump(session, args, fields)


def cmd_dump_config(session: Session, args: list[bytes]) -> None:
    queues = session.state.queues

    def fields(name: str) -> Any:
        queue = queues.get(name)
        return queue.config.canonical(name) if queue is not None else None

    _dump(session, args, fields)


def cmd_status(session: Session, args: list[bytes]) -> None:
    state = session.state
    if not args:
        session.out.append(state.status.encode() + b"\r\n")
        return
    if len(args) != 1:
        session.out.append(BAD_FORMAT)
        return
    word = args[0].decode("ascii", "replace").upper()
    if word not in ("UP", "READONLY", "QUIESCENT"):
        session.out.append(b"CLIENT_ERROR bad status\r\n")
        return
    try:
        state.set_status(word)
    except OSError as exc:  # the status would not survive a restart: keep the old one
        _status_unsaved.log("status %s: cannot save it: %s", word, exc)
        session.out.append(
            f"SERVER_ERROR cannot save the status: {exc.strerror or exc}\r\n".encode()
        )
        return
    session.out.append(END)


def cmd_reload(session: Session, args: list[bytes]) -> None:
    reload = session.state.reload_requested
    reply = reload() if reload is not None else "Reloaded config."
    session.out.append(reply.encode() + b"\r\n")


def cmd_verbosity(session: Session, args: list[bytes]) -> None:
    args, noreply = _noreply(args)
    if len(args) != 1 or not args[0].isdigit():
        session.out.append(BAD_FORMAT)
        return
    if not noreply:
        session.out.append(b"OK\r\n")


def cmd_shutdown(session: Session, args: list[bytes]) -> None:
    session.close_after(None)
    stop = session.state.shutdown_requested
    if stop is not None:
        session.state.loop.call_soon(stop)


def cmd_quit(session: Session, args: list[bytes]) -> None:
    session.close_after(None)


def cmd_not_supported(session: Session, args: list[bytes]) -> None:
    """incr, decr, touch: refused; silently with ``noreply``, which a client that sent it
    does not read (a reply would be taken for the answer to its next request)."""
    if not (args and args[-1] == b"noreply"):
        session.out.append(NOT_SUPPORTED)


def cmd_fetch_not_supported(session: Session, args: list[bytes]) -> None:
    """gat, gats (get and touch): refused aloud. They have no noreply form, so a last key
    named ``noreply`` is a key; memcached answers them, and a client that sent one waits for
    its answer (an ERROR, the reply to an unknown word, is not one to some of them)."""
    session.out.append(NOT_SUPPORTED)


COMMANDS: dict[bytes, Callable[[Session, list[bytes]], None]] = {
    b"delete": cmd_delete,
    b"flush": cmd_flush,
    b"flush_all": cmd_flush_all,
    b"flush_expired": cmd_flush_expired,
    b"flush_all_expired": cmd_flush_all_expired,
    b"version": cmd_version,
    b"stats": cmd_stats,
    b"dump_stats": cmd_dump_stats,
    b"dump_config": cmd_dump_config,
    b"monitor": cmd_monitor,
    b"confirm": cmd_confirm,
    b"status": cmd_status,
    b"reload": cmd_reload,
    b"verbosity": cmd_verbosity,
    b"shutdown": cmd_shutdown,
    b"quit": cmd_quit,
    b"incr": cmd_not_supported,
    b"decr": cmd_not_supported,
    b"touch": cmd_not_supported,
    b"gat": cmd_fetch_not_supported,
    b"gats": cmd_fetch_not_supported,
}
