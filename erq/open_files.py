"""The process's open-file limit, and the room it keeps for the queues' journals.

Every client connection and every queue's journal holds descriptors (one per segment), and
a journal needs a few more for a moment: a group commit's copies of its segments'
descriptors, a directory opened to be synced, a segment made by a rotation or a compaction.
Past the limit each of those fails with EMFILE, and a sync that fails leaves what it covered
not durable (with ``fsync = "always"`` the writes are answered ``SERVER_ERROR``). Connections
are what clients can open at will, so they may not take that room: a connection whose
descriptor is within RESERVE of the limit is refused as one past ``max_connections`` is.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("erq.server")

# Descriptors beyond the connections and the queues: listeners, the epoll and eventfds, the
# log, the lock, refused clients lingering (64 at most), and the journals' passing needs
# (a group commit's copies of segment descriptors, directories synced, rotations,
# compactions; a commit that finds no descriptor for its copies syncs without them).
RESERVE = 128
# Before Python 3.13 an mmap keeps a copy of the descriptor it maps, so a journal segment
# holds two; 3.13 can map without one (trackfd), and erq.journal.segment does.
MAPPING_HOLDS_A_DESCRIPTOR = sys.version_info < (3, 13)
DESCRIPTORS_PER_SEGMENT = 2 if MAPPING_HOLDS_A_DESCRIPTOR else 1
# What a queue's journal holds as a rule, to size the warning: its current segment (two
# descriptors before Python 3.13, one from it) and, from 3.13, its spare; a queue busy enough
# for a spare holds one more before 3.13, and a deep one a segment per 64 MiB more.
PER_QUEUE = 2
MIN_CONNECTIONS = 8
# What new queues leave (of RESERVE) for the journals' passing needs and the first
# connections: a queue whose descriptor number would fall within it is refused.
JOURNAL_RESERVE = 64
# What a segment for an item leaves (of JOURNAL_RESERVE) for the segments of removals, opens,
# confirms and compactions: a deep queue at the limit still drains and gives segments back.
SEGMENT_RESERVE = 32

_limit: int | None = None  # the soft limit raise_limit left in force (None: none, or unknown)


def raise_limit(max_connections: int, max_queues: int) -> int | None:
    """Lift the soft limit on open files to the hard limit, and say so when even that is short
    of what max_connections and max_queues want. Not only to what they want: a queue's
    journal holds descriptors for each of its segments (its own, and before Python 3.13 its
    mapping's), so a deep queue holds one or two per 64 MiB, which no setting bounds; a
    server that stopped at what the settings name ran out when a backlog grew, and could not
    replay it at the next start. (The Go runtime and the JVM lift it the same way; erq sizes nothing by it.)
    Returns the soft limit now in force (None: no limit, or none this platform tells)."""
    global _limit
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    needed = max_connections + PER_QUEUE * max_queues + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        # An infinite hard limit cannot be the soft one (Linux caps it at fs.nr_open, macOS
        # at OPEN_MAX): there, what the settings want.
        target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                log.debug("cannot raise the open-file limit to %d: %s", target, exc)
    _limit = None if soft == resource.RLIM_INFINITY else soft
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < needed:
        log.warning(
            "max_connections = %d and max_queues = %d want %d open files, and the limit is "
            "%d (ulimit -n): lower them or raise the limit (connections and new queues are "
            "refused short of it, to keep room for the journals)",
            max_connections,
            max_queues,
            needed,
            soft,
        )
    return soft


def leaves_room(limit: int | None, descriptor: int, connections: int) -> bool:
    """Whether a connection just accepted on ``descriptor`` leaves the journals their room
    under the open-file limit ``limit``. A new descriptor takes the lowest number free, so
    every one below it is in use: past ``limit - RESERVE`` the journals may find none. The
    first MIN_CONNECTIONS are let in whatever the limit, so that an operator can always
    connect (to delete queues, say)."""
    return limit is None or connections < MIN_CONNECTIONS or descriptor < limit - RESERVE


def room_for_a_journal(limit: int | None) -> bool:
    """Whether a new queue's journal leaves the other journals their passing needs under the
    open-file limit ``limit``: the number a new descriptor gets says how many are in use, as
    for a connection (a queue made past it would take the descriptors their syncs need)."""
    return limit is None or _lowest_free_descriptor() < limit - JOURNAL_RESERVE


def room_for_a_segment() -> bool:
    """Whether a journal may start a segment for an item under the limit raise_limit set,
    and leave SEGMENT_RESERVE descriptors to the segments of removals and compactions: a
    queue whose segments had taken every descriptor answered each get SERVER_ERROR (its
    removal needed a segment too) and could be emptied only by deleting it."""
    return _limit is None or _lowest_free_descriptor() < _limit - SEGMENT_RESERVE


def _lowest_free_descriptor() -> int:
    """The number a new descriptor gets, which says how many are in use below it (the
    limit, when none is left)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # none left at all
        return _limit if _limit is not None else 1 << 30
    os.close(fd)
    return fd


def descriptor_of(transport: object) -> int:
    """The descriptor of a transport's socket (-1 where the transport does not tell)."""
    get = getattr(transport, "get_extra_info", None)
    if get is None:
        return -1
    fd = get("fileno")  # erq's own connection layer
    if fd is None:
        sock = get("socket")
        fd = sock.fileno() if sock is not None else -1
    return fd
