"""Helpers shared by the socket-level tests (this module holds no tests): the exact reply bytes
of PROTOCOL.md, request and reply builders, a ``[server]``/``[queues]`` config maker, and
pollers that wait for a state change the server is known to make (never a sleep to hope).

The reply constants are spelled out here, not imported from ``erq``, so that the tests pin the
wire bytes independently of the implementation.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvloop

import erq
from erq.journal import compaction

from conftest import ErqProcess, RawClient

# ---- replies -----------------------------------------------------------------------------------
VERSION_LINE = b"VERSION %s\r\n" % erq.__version__.encode()
END = b"END\r\n"
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
DELETED = b"DELETED\r\n"
ERROR = b"ERROR\r\n"
OK = b"OK\r\n"
RELOADED = b"Reloaded config.\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_NAME = b"CLIENT_ERROR bad queue name\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LONG = b"CLIENT_ERROR line too long\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NOT_SUPPORTED = b"CLIENT_ERROR not supported by a queue\r\n"
READ_ONLY = b"SERVER_ERROR read only\r\n"
QUIESCENT = b"SERVER_ERROR quiescent\r\n"

MiB = 1 << 20

# dump_config of a queue with every key at its default (PROTOCOL section 10), in spec order.
DEFAULT_CONFIG = {
    "max_items": "none",
    "max_size": "none",
    "max_item_size": "none",
    "max_memory_size": str(128 * MiB),
    "max_journal_size": str(1 << 30),
    "max_age": "none",
    "max_queue_age": "none",
    "open_timeout": "none",
    "discard_old_when_full": "false",
    "journal": "true",
    "expire_to_queue": "none",
    "fsync": "100",
}


# ---- requests and expected replies -------------------------------------------------------------
def _token(v: int | bytes) -> bytes:
    return v if isinstance(v, bytes) else b"%d" % v


def set_req(
    name: bytes,
    data: bytes,
    flags: int | bytes = 0,
    exptime: int | bytes = 0,
    extra: bytes = b"",
) -> bytes:
    """A ``set`` request. ``flags`` and ``exptime`` may be given as raw bytes (to send values
    that are not numbers); ``extra`` goes after the byte count (`` noreply``)."""
    return b"set %s %s %s %d%s\r\n%s\r\n" % (
        name,
        _token(flags),
        _token(exptime),
        len(data),
        extra,
        data,
    )


def value(key: str, data: bytes, flags: int = 0) -> bytes:
    return b"VALUE %s %d %d\r\n%s\r\n" % (key.encode(), flags, len(data), data)


def one(key: str, data: bytes, flags: int = 0) -> bytes:
    """The whole reply to a one-key get that found ``data``."""
    return value(key, data, flags) + END


# ---- servers -----------------------------------------------------------------------------------
def config(server: str = "", queues: str = "") -> str:
    """A config file: ``[server]`` settings, then queue tables."""
    return f"[server]\n{server}\n{queues}"


def start(erq_factory, *, server: str = "", queues: str = "", **kw) -> ErqProcess:
    """A server with embedded defaults, or with a config file when settings are given."""
    if server or queues:
        return erq_factory(config=config(server, queues), **kw)
    return erq_factory(**kw)


def run_script(impl: str, script: str, *args: str, timeout: float = 60.0) -> dict:
    """Run ``script`` in a new interpreter on the given build (chosen at import, as a server's
    is) and return the JSON object its last output line holds."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Script text for run_script scripts that serve a queue in process and drive it over a socket.
SERVES_ON_THEN_STOP = r"""
async def serves_on_then_stop(server, reader, writer, queue=b"burst"):
    # One more item set and taken on the connection (the replies), then the server stops.
    writer.write(b"set %s 0 0 5\r\nafter\r\nget %s\r\n" % (queue, queue))
    await writer.drain()
    replies = [(await reader.readline()).decode() for _ in range(4)]
    writer.close()
    server.request_shutdown("test")
    await server.shutdown()
    return replies
"""


def served_on(replies: list[str], queue: str = "burst") -> bool:
    """What serves_on_then_stop's replies are when the queue still works."""
    return replies == ["STORED\r\n", f"VALUE {queue} 0 5\r\n", "after\r\n", "END\r\n"]


# ---- connection state --------------------------------------------------------------------------
def assert_open(c: RawClient) -> None:
    """The connection is still served: the next reply is the answer to a new request."""
    assert c.call(b"version\r\n") == VERSION_LINE


def assert_closed(c: RawClient) -> None:
    """The server closed the connection and sent nothing beyond what was already read."""
    assert c.is_closed()
    assert c.buf == b""


# ---- waiting -----------------------------------------------------------------------------------
def poll(check, what: str, timeout: float = 15.0):
    """Call ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {result!r})"
        time.sleep(0.01)


def wait_for_stat(c: RawClient, name: str, expected: object, timeout: float = 10.0) -> dict:
    """Poll ``stats`` until ``name`` has ``expected`` (a state change we know will happen)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = c.stats()
        if stats.get(name) == str(expected):
            return stats
        assert time.monotonic() < deadline, (
            f"{name} stayed {stats.get(name)!r}, wanted {expected!r}"
        )
        time.sleep(0.005)


# ---- dump_stats / dump_config ------------------------------------------------------------------
def parse_blocks(reply: bytes) -> dict[str, dict[str, str]]:
    """``dump_stats`` / ``dump_config`` blocks -> {queue: {field: value}} (order kept), checking
    the framing."""
    lines = reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""], reply
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in lines[:-2]:
        if current is None:
            assert line.startswith(b"queue '") and line.endswith(b"' {"), line
            current = blocks[line[7:-3].decode()] = {}
        elif line == b"}":
            current = None
        else:
            assert line.startswith(b"  ") and b"=" in line, line
            field, _, text = line[2:].partition(b"=")
            current[field.decode()] = text.decode()
    assert current is None, reply
    return blocks


def queue_names(c: RawClient) -> set[str]:
    """The queues that exist, by ``dump_stats``."""
    return set(parse_blocks(c.call(b"dump_stats\r\n", END)))


def dump_config(c: RawClient, *names: str) -> dict[str, dict[str, str]]:
    """``dump_config`` of ``names`` (every queue without names), as parsed blocks."""
    request = b" ".join([b"dump_config", *(n.encode() for n in names)]) + b"\r\n"
    return parse_blocks(c.call(request, END))


def queue_config(c: RawClient, name: str) -> dict[str, str]:
    """One existing queue's ``dump_config`` fields (the reply must be that queue's block only)."""
    blocks = dump_config(c, name)
    assert list(blocks) == [name], blocks
    return blocks[name]


# ---- process memory ----------------------------------------------------------------------------
def status_kib(pid: int | str, field: str) -> int:
    """A kB field of /proc/<pid>/status (``RssAnon``, ``RssFile``, ``VmHWM``...); the test is
    skipped where the kernel does not report it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    pytest.skip(f"no {field} in /proc/*/status")


# ---- connection layers -------------------------------------------------------------------------
# Each event loop's own transports (the pure-Python build's) and erq's epoll set on each loop
# (the compiled build's, Linux only).
LAYERS = ["asyncio", "uvloop"] + (
    ["epoll-asyncio", "epoll-uvloop"] if sys.platform.startswith("linux") else []
)


def new_loop(layer: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if layer.endswith("uvloop") else asyncio.new_event_loop()


async def open_listener(loop: asyncio.AbstractEventLoop, layer: str, factory):
    """A listener on 127.0.0.1 and a free port whose clients become ``factory()``."""
    if layer.startswith("epoll"):
        from erq._fast._epoll import listen  # an ImportError fails the test

        return await listen(loop, "127.0.0.1", 0, factory)
    return await loop.create_server(factory, "127.0.0.1", 0)


async def close_listener(listener, layer: str) -> None:
    listener.close()
    await listener.wait_closed()
    if layer.startswith("epoll"):
        listener.close_clients()


def compacting_held(journal, opens: list, items: list, monkeypatch) -> threading.Event:
    """Start a compaction of ``journal`` to the state ``opens`` (open reads) and ``items``
    (queued) and hold it at its snapshot's fsync; set the returned event to let it go on."""
    entered, gate = threading.Event(), threading.Event()
    real = compaction._fsync_file

    def held(fd):
        entered.set()
        assert gate.wait(30)
        real(fd)

    monkeypatch.setattr(compaction, "_fsync_file", held)
    journal.compact(opens, items)
    assert entered.wait(30)
    return gate
