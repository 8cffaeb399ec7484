"""Feed recorded client traffic through erq's protocol layer in process; print what it wrote.

    python tests/protocol_driver.py < cases.json > replies.json

Used by ``test_builds_differential.py``, which runs it once per build (``ERQ_NO_EXTENSIONS``)
and compares the outputs byte for byte. Each case is ``{"config": TOML, "events": [...]}``;
an event is ``["data", conn, hex]`` (bytes a client sent, in one read; to a new client when
connection ``conn`` is closed), ``["close", conn]`` (the client went away) or ``["eof", conn]``
(it half-closed). Each case gets a fresh server
state over a journal in a temporary directory, on an asyncio loop, and its output is every
connection's written bytes in order, the queues' item counts, and their contents as a new
collection recovers them from the journals.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erq import IMPLEMENTATION, sliced  # noqa: E402
from erq.config import load_config  # noqa: E402
from erq.journal import QueueJournal  # noqa: E402
from erq.protocol import MemcacheProtocol  # noqa: E402
from erq.queues import QueueCollection  # noqa: E402
from erq.ring import ITEM_OVERHEAD  # noqa: E402
from erq.state import ServerState  # noqa: E402

# Work done in slices ends a slice by the clock: on a busy machine a flush_all_expired or a
# stats would give way at other points in each build, and the other connections' requests
# would come between them at other places. One slice, then, whatever it takes.
sliced.SLICE = 3600.0


class Transport:
    """Records writes; closing is remembered, and the protocol hears of it a pass later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: int, out: list) -> None:
        self.loop, self.conn, self.out = loop, conn, out
        self.closing = False
        self.protocol: MemcacheProtocol | None = None

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.out.append([self.conn, bytes(data).hex()])

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.out.append([self.conn, "closed"])
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def open_journal(directory: Path, qcfg):
    return QueueJournal.open(
        directory,
        fsync="never",
        max_memory_size=qcfg.max_memory_size,
        max_journal_size=qcfg.max_journal_size,
        item_overhead=ITEM_OVERHEAD,
    )


def contents(queues: QueueCollection) -> dict[str, list[str]]:
    """Every queue's items, head first, taken out (flags and data)."""
    out = {}
    for name in sorted(queues.names()):
        queue = queues.get(name)
        items = []
        while (item := queue.take(False)) is not None:
            items.append(f"{item.flags}:{bytes(item.data).hex()}")
        out[name] = items
    return out


async def run_case(case: dict, scratch: Path) -> dict:
    loop = asyncio.get_running_loop()
    config_path = scratch / "erq.toml"
    config_path.write_text(case["config"])
    config = load_config(str(config_path), cli={"data_dir": str(scratch / "data")})
    queues = QueueCollection(config, scratch / "data", journal_factory=open_journal)
    queues.load_existing()
    state = ServerState(config, queues, loop)
    state.ready = True
    out: list = []
    conns: dict[int, tuple[MemcacheProtocol, Transport]] = {}

    def connection(conn: int) -> tuple[MemcacheProtocol, Transport]:
        if conn not in conns or conns[conn][1].closing:  # a closed number is a new client
            proto = MemcacheProtocol(state)
            transport = Transport(loop, conn, out)
            transport.protocol = proto
            proto.connection_made(transport)
            conns[conn] = (proto, transport)
        return conns[conn]

    for event in case["events"]:
        kind, conn = event[0], event[1]
        if kind == "data":
            proto, transport = connection(conn)
            proto.data_received(bytes.fromhex(event[2]))
        elif conn in conns and not conns[conn][1].closing:
            proto, transport = conns[conn]
            if kind == "close" or not proto.eof_received():
                transport.close()
        for _ in range(3):
            await asyncio.sleep(0)
    for _proto, transport in conns.values():
        transport.close()
    for _ in range(3):
        await asyncio.sleep(0)
    counts = {name: queues.get(name).items for name in sorted(queues.names())}
    queues.close()
    # What the journals give back (the open reads went back at the closes above).
    restored = QueueCollection(config, scratch / "data", journal_factory=open_journal)
    restored.load_existing()
    recovered = contents(restored)
    restored.close()
    return {"out": out, "counts": counts, "recovered": recovered}


def main() -> int:
    cases = json.load(sys.stdin)
    results = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="erq-diff-") as scratch:
            results.append(asyncio.run(run_case(case, Path(scratch))))
    json.dump({"implementation": IMPLEMENTATION, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
