"""What queues made and deleted all the time (a reply queue per request, say) cost the other
clients: one connection churns queues while another does round trips on a steady queue.

Starts erq from this checkout (journal on, defaults) on a free loopback port. For
``--seconds``, a churn process sends, over and over, ``set`` to a new queue, ``get`` of it and
``delete`` of it, each waiting for its reply (``--rate`` caps the queues per second; 0: as
fast as the server answers); meanwhile this process times ``set`` + ``get`` round trips on one
queue that always exists. Prints the churn's queues per second and the round trips' rate,
p50, p99 and max. ``--server-cpu`` / ``--client-cpu`` pin the server and both clients with
taskset (the clients share a core), as the end-to-end runner does.

    python benchmarks/queue_churn.py --seconds 4 --server-cpu 0 --client-cpu 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import time

from localserver import percentile, running_erq


def _churn(port: int, seconds: float, rate: float, cpu: int | None, get: bool, out) -> None:
    """Make, use and delete queues ``reply_<n>`` until the time is up; sends how many."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    replies = sock.makefile("rb")
    n = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if rate:
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
        sock.sendall(b"set reply_%d 0 0 5\r\nhello\r\n" % n)
        assert replies.readline() == b"STORED\r\n"
        if get:
            sock.sendall(b"get reply_%d\r\n" % n)
            while replies.readline() != b"END\r\n":
                pass
        sock.sendall(b"delete reply_%d\r\n" % n)
        assert replies.readline() == b"DELETED\r\n"
        n += 1
    out.send(n / (time.monotonic() - start))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=0.0, help="queues per second (0: no cap)")
    parser.add_argument("--no-get", action="store_true", help="delete each queue with its item")
    parser.add_argument("--server-cpu", type=int)
    parser.add_argument("--client-cpu", type=int)
    args = parser.parse_args()
    if args.client_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_cpu})
    with running_erq(cpu=args.server_cpu, what="queue_churn") as (_, port):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        replies = sock.makefile("rb")
        receive, send = multiprocessing.Pipe(duplex=False)
        churn = multiprocessing.Process(
            target=_churn,
            args=(port, args.seconds, args.rate, args.client_cpu, not args.no_get, send),
        )
        churn.start()
        rtts = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            sock.sendall(b"set steady 0 0 5\r\nhello\r\nget steady\r\n")
            assert replies.readline() == b"STORED\r\n"
            while replies.readline() != b"END\r\n":
                pass
            rtts.append((time.perf_counter() - start) * 1e6)
        churned = receive.recv() if receive.poll(60) else float("nan")
        churn.join(30)
        sock.close()
    rtts.sort()
    print(
        f"churn {churned:,.0f} queues/s; steady set+get {len(rtts) / args.seconds:,.0f}/s, "
        f"p50 {percentile(rtts, 0.5):,.0f} us, p99 {percentile(rtts, 0.99):,.0f} us, "
        f"max {rtts[-1]:,.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
