"""Run inside a network namespace of its own (``unshare -rn``) by test_keepalive: a server
with ``tcp_keepalive = "1s"``, a worker holding an open read, then the loopback taken down,
so that nothing the worker's host sends or is sent arrives any more, as when a host dies or
drops off the network. Prints one JSON line: what the server did once its probes went
unanswered.

Two ways the worker is cut off: ``idle``, holding a read it was handed before (the server's
keepalive probes go unanswered); ``in-flight``, blocked in a reliable get that is handed an
item only once the network is gone (an item of another queue expires into its queue), so
that the VALUE is never acknowledged and the kernel retransmits instead of probing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import ErqProcess


def link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


def server_sockets(port: int) -> list[list[str]]:
    """The rows of the server's port in this namespace's TCP table (any state)."""
    local = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        return [row.split() for row in list(table)[1:] if row.split()[1].endswith(local)]


def all_acked(port: int) -> bool:
    """Nothing the server sent waits for an ACK (tx_queue 0): with data in flight the kernel
    retransmits, for ~15 min by default, and keepalive does not start."""
    return all(row[4].startswith("00000000:") for row in server_sockets(port))


CONFIG = """[server]
tcp_keepalive = "1s"
expiry_sweep = "100ms"
[queues."later"]
max_age = "1s"
expire_to_queue = "q"
"""


def main(impl: str, tmp: str, mode: str) -> None:
    link("up")
    data = Path(tmp) / "data"
    proc = ErqProcess(impl, data, config=CONFIG).start()
    try:
        worker = proc.client()
        if mode == "idle":
            assert worker.call(b"set q 0 0 4\r\nwork\r\n") == b"STORED\r\n"
            reply = worker.call(b"get q/open\r\n", b"END\r\n")
            assert reply == b"VALUE q/open 0 4\r\nwork\r\nEND\r\n"
        else:  # in a second, the item moves to q and goes to the blocked worker
            assert worker.call(b"set later 0 0 4\r\nwork\r\n") == b"STORED\r\n"
            worker.send(b"get q/t=30000/open\r\n")
        deadline = time.monotonic() + 10
        while not all_acked(proc.port) and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker's delayed ACK of the value
        opened = len(server_sockets(proc.port))  # the listener and the worker's connection
        link("down")
        started = time.monotonic()
        while len(server_sockets(proc.port)) == opened and time.monotonic() - started < 30:
            time.sleep(0.05)
        gone_after = time.monotonic() - started
        link("up")
        late = proc.client()
        deadline = time.monotonic() + 10
        while (reply := late.call(b"get q\r\n", b"END\r\n")) == b"END\r\n":
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stats = late.stats()
        print(
            json.dumps(
                {
                    "gone_after": round(gone_after, 2),
                    "reply": reply.decode(),
                    "curr_connections": int(stats["curr_connections"]),
                    "canceled": stats.get("queue_q_canceled_transactions"),
                    "expired": stats.get("queue_later_expired_items"),
                }
            )
        )
    finally:
        link("up")
        proc.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
