"""Work that grows with the data, done a slice of loop time at a time.

``stats`` and ``dump_stats`` over thousands of queues, ``flush_expired`` over a deep queue of
expired items, and the admin port's stats documents would each hold the event loop, and with
it every client, for as long as they take (4,000 queues: ~0.15 s compiled, ~0.4 s pure;
200,000 expired items: ~0.1 s compiled, ~2.7 s pure). Here such work runs SLICE seconds at a
time and the loop serves its sockets in between.

A command's work is a generator that yields each time its slice is used up and returns its
reply, or the rest of it: a long reply yields what it has made so far (bytes) at the end of
each slice, and that part goes out at once. While the client does not take it (its output past
OUT_BUDGET and the transport's buffer full), the work waits as a get does between keys, so
that a stats reply of 40,000 queues that nobody reads holds about OUT_BUDGET, not 16 MB (200
clients each sending one stats to 4,096 queues and reading nothing held 326 MB).

``answer_in_slices`` runs the first slice at once, so work that fits in one answers as before,
with no loop pass more. Otherwise the rest runs as the connection's blocked operation
(``Session.resume_next_pass``, as a get that meets expired items does): the requests the client
pipelined behind it wait, and their replies come after its own; a client that leaves ends it
(``cancel``: what was done stays done); once the server is stopping, what is left runs at once
(``finish_now``, which finishes a get that gave way to expired items too), so that the reply
goes out before the journals close.

Plain Python in both builds: none of it is on the per-request hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from erq.queues import QueueCollection
    from erq.session import Session

log = logging.getLogger("erq.commands")

SLICE = 0.002  # seconds of work before the loop serves its sockets again

T = TypeVar("T")

# What a command's work is: a generator that yields when its slice is up (None, or the part
# of its reply made so far) and returns the reply, or its last part.
Work = Generator[bytes | None, None, bytes]


def in_slices(steps: Iterable[T]) -> Iterator[T | None]:
    """Each of ``steps``, and None each time SLICE seconds have passed since the slice began
    (the caller's work on the steps counts too): there the caller lets the loop serve its
    sockets before it goes on."""
    deadline = time.perf_counter() + SLICE
    for step in steps:
        yield step
        if time.perf_counter() >= deadline:
            yield None
            deadline = time.perf_counter() + SLICE


def each_found(
    names: Iterable[str], look_up: Callable[[str], T | None]
) -> Iterator[tuple[str, T] | None]:
    """``(name, look_up(name))`` for each of ``names``, in slices (``in_slices``); a name
    ``look_up`` finds nothing for (a queue deleted meanwhile) is left out."""
    return in_slices((name, found) for name in names if (found := look_up(name)) is not None)


def each_queue_stats(
    queues: QueueCollection, names: Iterable[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]] | None]:
    """``(name, queue_stats)`` of ``names`` (default: every queue, in name order), in slices;
    a queue deleted meanwhile, or that does not exist, is left out."""
    return each_found(queues.names() if names is None else names, queues.queue_stats)


class LongText:
    """A long reply made a slice at a time: ``append`` its pieces, and take each slice's as
    one ``part`` (sent then, see the module's docstring); the work returns the last part."""

    __slots__ = ("_pieces", "append")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.append = self._pieces.append

    def part(self) -> bytes:
        """The pieces appended since the last part, joined."""
        done = b"".join(self._pieces)
        self._pieces.clear()
        return done


class SlicedReply:
    """A command whose work runs a slice at a time, as its connection's blocked operation."""

    __slots__ = ("session", "work")

    def __init__(self, session: Session, work: Work) -> None:
        self.session = session
        self.work = work

    def run(self) -> bool:
        """Run a slice of the work (all that is left once the server is stopping). True once
        the reply is in ``session.out``; False when the rest waits for the loop's next pass,
        or for the client to take the part sent (``Session.blocked_on_output``)."""
        session = self.session
        state = session.state
        try:
            while True:
                part = next(self.work)
                if part:
                    session.add_long_reply(part)
                if not state.stopping:
                    break
        except StopIteration as done:
            session.add_long_reply(done.value)
            return True
        except Exception:  # a bug: drop the connection, not the request after it, silently
            log.exception("a sliced command failed; closing its connection")
            session.close_after(None)
            return True
        # Each pass sends its part (the session flushes after it), so the budget alone would
        # never run out: a transport that holds more than it may (its client not reading)
        # stops the work too.
        if (session.write_paused or session.out_room < 0) and session.output_full():
            session.blocked = self
            session.blocked_on_output = True  # resumed by Session._output_taken
            return False
        session.resume_next_pass(self)
        return False

    def cancel(self) -> None:
        """The connection closed: the work stops where it is."""
        self.work.close()


def answer_in_slices(session: Session, work: Work) -> None:
    """Run ``work``'s first slice now; if it does not finish, the rest blocks the connection's
    pipeline and runs a slice per loop pass."""
    SlicedReply(session, work).run()


def finish_now(session: Session) -> None:
    """The server is stopping (``state.stopping``): what this connection waits on the loop's
    next pass for (a sliced command, or a get or monitor behind expired items) runs now, until
    it answers or waits for something else, and so does its pipeline: its replies go out and
    what it removed is journaled before the journals close. A long reply waiting for its
    client to take the part sent is finished too: the rest joins what the client has yet to
    read, which the stop gives it time to (else the reply was cut off mid-line)."""
    while not session.closed:
        op = session.blocked
        if session.resumes_next_pass:
            session.resumes_next_pass = False  # the pass it waits for finds nothing to do
        elif session.blocked_on_output and isinstance(op, SlicedReply):
            session.blocked_on_output = False
        else:
            return
        if op is not None and op.run():
            session.unblock()
