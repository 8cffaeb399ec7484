"""Instructions per request through erq's own code, counted by callgrind (deterministic).

Feeds ``MemcacheProtocol.data_received`` in process, with a fake transport and a real journal
(fsync period), on the server's event loop (uvloop when installed), so the count covers
parser -> session -> commands -> queue -> journal and the reply (the Cython build writes it to
/dev/null with the write() a socket gets; the pure-Python build hands it to the fake
transport), but not the kernel or the event loop's polling. Unlike a timing, it does not depend on what
else the machine is doing, which makes it the measure to compare two builds or two commits.

    python benchmarks/instructions.py                 # every shape, needs valgrind
    ERQ_NO_EXTENSIONS=1 python benchmarks/instructions.py set64
    python benchmarks/instructions.py --run set64 6400   # one plain run (what callgrind runs)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile

SET = b"set q 0 0 10\r\n0123456789\r\n"
# name -> (requests per read, request)
SHAPES = {
    "set64": (64, SET),
    "set1": (1, SET),
    # set1 on a queue past max_memory_size (1 MiB here): each item is kept only in the
    # journal (read-behind), its position noted for the gets that will read it back.
    "spill1": (1, SET),
    "get64": (64, b"get q\r\n"),
    "get1": (1, b"get q\r\n"),
    # get1 on a queue past max_memory_size (1 MiB here): the items come back from the journal
    # (read-behind) in steps as the head drains, as when a deep queue outgrows memory.
    "drain1": (1, b"get q\r\n"),
    "open1": (1, b"get q/close/open\r\n"),
    # A consumer blocked in get q/t=1000 on an empty queue, woken by a producer's set: per
    # item, the set, the wake-up with its VALUE, and the consumer's next (blocking) get.
    "wake1": (1, SET),
}
WAKE_GET = b"get q/t=1000\r\n"
PREFILL_READS = 2000  # 128,000 items before a get shape, so that no get finds the queue empty


class _Sink:
    """Where the replies go: /dev/null, through the same write() a socket gets."""

    def __init__(self) -> None:
        self._fd = os.open(os.devnull, os.O_WRONLY)

    def fileno(self) -> int:
        return self._fd


class _Transport:
    def __init__(self) -> None:
        self._sink = _Sink()

    def get_extra_info(self, name: str, default=None):
        return self._sink if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        pass  # the pure-Python build's writer hands every reply here

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _drive(shape: str, requests: int) -> None:
    from erq.config import load_config
    from erq.journal import GroupCommit, QueueJournal
    from erq.protocol import MemcacheProtocol
    from erq.queues import QueueCollection
    from erq.state import ServerState

    loop = asyncio.get_running_loop()
    data_dir = tempfile.mkdtemp(prefix="erq-instructions-")
    try:
        path = None
        if shape in ("drain1", "spill1"):
            path = os.path.join(data_dir, "erq.toml")
            with open(path, "w") as f:
                f.write('[queues.default]\nmax_memory_size = "1MiB"\n')
        config = load_config(path, cli={"data_dir": data_dir}, env={})
        commit = GroupCommit(loop)

        def open_journal(directory, qcfg):
            return QueueJournal.open(
                directory,
                fsync=qcfg.fsync,
                max_memory_size=qcfg.max_memory_size,
                max_journal_size=qcfg.max_journal_size,
                commit=commit,
            )

        queues = QueueCollection(config, data_dir, journal_factory=open_journal)
        state = ServerState(config, queues, loop)
        state.ready = True
        protocol = MemcacheProtocol(state)
        protocol.connection_made(_Transport())
        consumer = MemcacheProtocol(state)
        consumer.connection_made(_Transport())
        per_read, request = SHAPES[shape]
        prefill = PREFILL_READS if shape.startswith(("get", "open", "drain", "spill")) else 20
        if shape == "wake1":
            prefill = 0  # the consumer must find the queue empty
        for _ in range(prefill):
            protocol.data_received(SET * 64)
        chunk = request * per_read
        if shape == "wake1":
            consumer.data_received(WAKE_GET)
            for _ in range(requests):
                protocol.data_received(chunk)  # wakes the consumer: VALUE, then END
                consumer.data_received(WAKE_GET)  # blocks again (the queue is empty)
        else:
            for _ in range(requests // per_read):
                protocol.data_received(chunk)
        queues.close()
        commit.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _instructions(shape: str, requests: int) -> int:
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--run",
        shape,
        str(requests),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise SystemExit(f"callgrind printed no count:\n{out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=list(SHAPES), help=", ".join(SHAPES))
    parser.add_argument("--requests", type=int, default=3200, help="requests measured (3200)")
    parser.add_argument("--run", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.run:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_drive(ns.run[0], int(ns.run[1])))
        else:
            uvloop.run(_drive(ns.run[0], int(ns.run[1])))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (Debian: apt-get install valgrind)")
    import erq

    print(f"erq {erq.__version__} ({erq.IMPLEMENTATION} build); instructions per request:")
    for shape in ns.shapes:
        # The difference of two runs leaves out start-up, imports and the prefill.
        base = _instructions(shape, 0)
        full = _instructions(shape, ns.requests)
        print(f"  {shape:6s} {(full - base) / ns.requests:10,.0f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in both runs
    try:
        import erq  # noqa: F401  (installed, or on PYTHONPATH)
    except ImportError:  # run from a checkout: measure the checkout (and its in-place build)
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, checkout)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (checkout, os.environ.get("PYTHONPATH")) if p
        )
    main()
