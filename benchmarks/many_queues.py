"""What a server with many queues costs while it is idle, and how long its periodic sweep holds
requests back.

Starts erq from this checkout (journal on, defaults) on a free loopback port and creates
``--queues`` queues with one item each. Then, for ``--seconds`` each: the server's CPU time
per second while no request comes (user + sys from /proc), and the round trips of a
``version`` sent every millisecond on one connection (p50, p99, max, and how many took over
10 ms). Every queue is visited by the sweep once a second (expiry, compaction, its journal's
files).

    python benchmarks/many_queues.py --queues 2000
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from localserver import cpu_seconds, percentile, running_erq


def _settle(pid: int, window: float = 1.0, limit: float = 60.0) -> float:
    """Wait for the work of creating the queues to end: until the server's CPU over a window
    (a second: one sweep) is under half of it and within a quarter of the window before.
    Returns the seconds it took (the limit if it never settled)."""
    start = time.monotonic()
    previous = None
    while time.monotonic() - start < limit:
        before = cpu_seconds(pid)
        time.sleep(window)
        used = cpu_seconds(pid) - before
        if (
            previous is not None
            and used < window / 2
            and abs(used - previous) <= max(used, previous) / 4 + 0.01
        ):
            break
        previous = used
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    os.environ["ERQ_MAX_QUEUES"] = str(max(args.queues, 1) + 16)  # the server inherits it
    with running_erq(what="many_queues") as (server, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        replies = sock.makefile("rb")
        sock.sendall(b"".join(b"set q%d 0 0 2\r\nhi\r\n" % i for i in range(args.queues)))
        for _ in range(args.queues):
            if replies.readline() != b"STORED\r\n":
                raise SystemExit("many_queues: a set was refused")
        settled = _settle(server.pid)  # the creation's own work (journals, first syncs)
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(args.seconds)  # idle: only the server's own periodic work
        cpu = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        rtts = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            sock.sendall(b"version\r\n")
            replies.readline()
            rtts.append((time.perf_counter() - start) * 1000)
            time.sleep(0.001)
        sock.close()
    rtts.sort()
    print(
        f"{args.queues} queues, {len(rtts)} pings: p50 {percentile(rtts, 0.5):.3f} ms, "
        f"p99 {percentile(rtts, 0.99):.3f} ms, max {rtts[-1]:.1f} ms, "
        f"{sum(r > 10 for r in rtts)} over 10 ms; idle server CPU {cpu * 1000:.0f} ms per second"
        f" (measured once the creation's work ended, {settled:.1f} s after the last STORED)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
