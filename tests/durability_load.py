"""Load driver for the crash-cycle test: producers and reliable consumers on raw sockets.

Each cycle runs producer and consumer threads against a live server until the server is
killed under them; every thread then records what it knows and what it cannot know:

- a producer's value is *acked* once ``STORED`` arrived, *maybe* if the server died between
  the request and the reply (it may or may not have been journaled);
- a consumer's delivery (``get q/t=50/close/open``) is *confirmed* once the reply to the next
  request arrived (its ``close`` ran before that reply was sent), and *uncertain* if the
  connection died first: the read was open at the crash, so the server must either have
  journaled the confirm or hand the value out again after the restart.

:class:`Ledger` merges the threads' records and judges them: nothing acked may be lost, every
delivered value must be byte-exact, and a value may come back only after an uncertain
delivery in an earlier cycle.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CONFIRMED = "confirmed"  # the close of this delivery was answered
UNCERTAIN = "uncertain"  # open (or its close unanswered) when the server died
DRAINED = "drained"  # taken by a plain get in the final drain

NETWORK_ERRORS = (OSError, ConnectionError, EOFError)


def make_value(producer: int, seq: int) -> bytes:
    """A unique value whose bytes follow from its name, so corruption is detectable.

    The payload is binary (CR, LF and NUL included sometimes) and 0-300 bytes long."""
    name = b"%02d:%07d:" % (producer, seq)
    digest = hashlib.blake2b(name, digest_size=64).digest()
    size = (seq * 37 + producer * 11) % 301
    return name + (digest * (size // 64 + 1))[:size]


def value_key(value: bytes) -> tuple[int, int] | None:
    """(producer, seq) named by a value, or None if it is not one of ours."""
    parts = value.split(b":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


class LoadThread(threading.Thread):
    """A client thread that runs until its connection fails (the server was killed)."""

    def __init__(self, connect: Callable[[], object], deadline: float) -> None:
        super().__init__(daemon=True)
        self.connect = connect
        self.deadline = deadline  # a safety net: the server should have been killed long before
        self.protocol_errors: list[str] = []
        self.overran = False
        self.progress = 0  # replies that carried an item (sets stored, values received)

    def run(self) -> None:
        try:
            client = self.connect()
        except NETWORK_ERRORS:
            return
        try:
            self.work(client)
        except NETWORK_ERRORS:
            self.crashed()
        except AssertionError as exc:  # a reply that is not what the protocol promises
            self.protocol_errors.append(str(exc))
        finally:
            client.close()

    def work(self, client) -> None:
        raise NotImplementedError

    def crashed(self) -> None:
        """The connection died mid-request."""


class Producer(LoadThread):
    """``set`` unique values one at a time, waiting for each reply."""

    def __init__(self, connect, deadline: float, queue: str, pid: int, seq: int) -> None:
        super().__init__(connect, deadline)
        self.queue = queue.encode()
        self.pid = pid
        self.seq = seq  # the next sequence number (continues across cycles)
        self.acked: list[bytes] = []
        self.maybe: list[bytes] = []
        self.in_flight: bytes | None = None

    def work(self, client) -> None:
        while time.monotonic() < self.deadline:
            value = make_value(self.pid, self.seq)
            self.seq += 1
            self.in_flight = value
            client.send(b"set %s 0 0 %d\r\n%s\r\n" % (self.queue, len(value), value))
            reply = client.line()
            self.in_flight = None
            if reply == b"STORED\r\n":
                self.acked.append(value)
                self.progress += 1
            else:
                self.protocol_errors.append(f"set {value[:12]!r}: {reply!r}")
                return
        self.overran = True

    def crashed(self) -> None:
        if self.in_flight is not None:
            self.maybe.append(self.in_flight)
            self.in_flight = None


class Consumer(LoadThread):
    """The reliable-read worker loop: ``get q/t=50/close/open`` again and again."""

    def __init__(self, connect, deadline: float, queue: str) -> None:
        super().__init__(connect, deadline)
        self.request = b"get %s/t=50/close/open\r\n" % queue.encode()
        self.deliveries: list[tuple[bytes, str]] = []
        self.held: bytes | None = None  # received, its close not yet answered

    def work(self, client) -> None:
        while time.monotonic() < self.deadline:
            client.send(self.request)
            values = read_values(client)
            # The reply arrived, so this request's close ran: the held read is confirmed.
            if self.held is not None:
                self.deliveries.append((self.held, CONFIRMED))
                self.held = None
            if len(values) > 1:
                self.protocol_errors.append(f"{len(values)} values for one key")
            if values:
                self.held = values[0]
                self.progress += 1
        self.overran = True

    def crashed(self) -> None:
        if self.held is not None:
            self.deliveries.append((self.held, UNCERTAIN))
            self.held = None


def read_values(client) -> list[bytes]:
    """The data of each VALUE in one get reply, read byte-exactly up to END."""
    values = []
    while True:
        line = client.line()
        if line == b"END\r\n":
            return values
        if not line.startswith(b"VALUE "):
            raise AssertionError(f"unexpected reply line {line!r}")
        size = int(line.split()[3])
        block = client.read_exact(size + 2)
        if block[-2:] != b"\r\n":
            raise AssertionError(f"data block not followed by CRLF: {block[-2:]!r}")
        values.append(block[:-2])


@dataclass
class Ledger:
    """Everything the load observed, merged over every cycle, and the verdict on it."""

    acked: set[bytes] = field(default_factory=set)
    maybe: set[bytes] = field(default_factory=set)
    # per value: [(cycle, status), ...] in the order the deliveries happened
    deliveries: dict[bytes, list[tuple[int, str]]] = field(default_factory=dict)
    protocol_errors: list[str] = field(default_factory=list)
    overruns: int = 0
    cycles: int = 0
    next_seq: dict[int, int] = field(default_factory=dict)

    def run_cycle(
        self,
        connect: Callable[[], object],
        kill: Callable[[], None],
        *,
        queue: str,
        producers: int,
        consumers: int,
        load_seconds: float,
        join_timeout: float = 30.0,
    ) -> None:
        """Start the threads against a running server, let them work ``load_seconds``, call
        ``kill`` (SIGKILL the server) and collect what every thread saw."""
        deadline = time.monotonic() + load_seconds + join_timeout
        threads: list[LoadThread] = [
            Producer(connect, deadline, queue, pid, self.next_seq.get(pid, 0))
            for pid in range(producers)
        ]
        threads += [Consumer(connect, deadline, queue) for _ in range(consumers)]
        for thread in threads:
            thread.start()
        # The server dies under the load once it has run ``load_seconds`` and both sides have
        # made progress (so every cycle crashes a server with sets and reads in flight).
        started = time.monotonic()
        while not (
            time.monotonic() - started >= load_seconds
            and any(t.progress for t in threads if isinstance(t, Producer))
            and any(t.progress for t in threads if isinstance(t, Consumer))
        ):
            if time.monotonic() > deadline:
                raise AssertionError("the load made no progress")
            time.sleep(0.005)
        kill()
        for thread in threads:
            thread.join(join_timeout)
            if thread.is_alive():
                raise AssertionError("a load thread did not finish after the server was killed")
        cycle = self.cycles
        self.cycles += 1
        for thread in threads:
            self.protocol_errors.extend(thread.protocol_errors)
            self.overruns += thread.overran
            if isinstance(thread, Producer):
                self.acked.update(thread.acked)
                self.maybe.update(thread.maybe)
                self.next_seq[thread.pid] = thread.seq
            else:
                for value, status in thread.deliveries:
                    self.deliveries.setdefault(value, []).append((cycle, status))

    def drained(self, values: list[bytes]) -> None:
        """The values a final drain (plain gets after the last restart) returned."""
        cycle = self.cycles
        for value in values:
            self.deliveries.setdefault(value, []).append((cycle, DRAINED))

    def verdict(self) -> dict[str, int]:
        """Counts of each outcome; the first five must be zero."""
        corrupt = unknown = bad_duplicates = redelivered = 0
        for value, seen in self.deliveries.items():
            key = value_key(value)
            if key is None:
                unknown += 1
                continue
            if value != make_value(*key):
                corrupt += 1
                continue
            if value not in self.acked and value not in self.maybe:
                unknown += 1  # delivered but never sent
            # Every delivery but the last must have been open at a crash, in an earlier cycle.
            for (cycle, status), (next_cycle, _) in zip(seen, seen[1:], strict=False):
                if status == UNCERTAIN and cycle < next_cycle:
                    redelivered += 1
                else:
                    bad_duplicates += 1
        delivered = set(self.deliveries)
        lost = len(self.acked - delivered)
        return {
            "lost": lost,
            "corrupt": corrupt,
            "unknown": unknown,
            "bad_duplicates": bad_duplicates,
            "protocol_errors": len(self.protocol_errors),
            "redelivered": redelivered,
            "acked": len(self.acked),
            "maybe": len(self.maybe),
            "maybe_delivered": len(self.maybe & delivered),
            "delivered": len(delivered),
            "confirmed": sum(
                1 for seen in self.deliveries.values() for _, s in seen if s == CONFIRMED
            ),
            "uncertain": sum(
                1 for seen in self.deliveries.values() for _, s in seen if s == UNCERTAIN
            ),
            "drained": sum(1 for seen in self.deliveries.values() for _, s in seen if s == DRAINED),
            "cycles": self.cycles,
            "overruns": self.overruns,
        }
