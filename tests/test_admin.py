"""The admin HTTP port (erq/admin.py): /healthz, /readyz, /stats.json, /metrics over real sockets.

Servers are real subprocesses of both builds (``impl``) with an admin port of their own; the
HTTP client is a raw socket, so that the exact status line, headers and body are what is checked.
The last tests drive :class:`erq.admin.AdminServer` in-process (it has one implementation) for
what a subprocess cannot show: the not-yet-recovered answer and the read deadline.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import socket
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ErqProcess, RawClient, free_port
from support import END, STORED

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


# ---- an HTTP client of one request -------------------------------------------------------------
class Reply:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no end of head in {raw!r}"
        lines = head.decode("ascii").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        self.status = int(status)
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def send(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` and read until the server closes (every answer closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def http(port: int, path: str, method: str = "GET") -> Reply:
    reply = Reply(send(port, f"{method} {path} HTTP/1.1\r\nHost: erq\r\n\r\n".encode()))
    assert reply.headers["connection"] == "close"
    dated = email.utils.parsedate_to_datetime(reply.headers["date"])  # RFC 9110: dated
    assert abs(dated.timestamp() - time.time()) < 60, reply.headers["date"]
    if method != "HEAD":
        assert int(reply.headers["content-length"]) == len(reply.body)
    return reply


def admin_server(erq_factory) -> tuple[ErqProcess, int]:
    port = free_port()
    return erq_factory(args=["--admin-port", str(port)]), port


# ---- /metrics parsing --------------------------------------------------------------------------
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def parse_metrics(text: str) -> dict[str, dict]:
    """Prometheus text format 0.0.4 -> {family: {"type", "help", "samples": {labels: value}}}.
    Fails on any line that is not HELP, TYPE or a sample, on a sample before its family's HELP
    and TYPE, on a family given twice, and on a sample name outside its family."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} twice"
            current = families[name] = {"help": help_text, "type": None, "samples": {}}
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is families.get(name) and current["type"] is None, line
            assert kind in ("counter", "gauge"), line
            current["type"] = kind
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        assert current is not None and current["type"] is not None, f"{name} before HELP/TYPE"
        assert name == next(n for n, f in families.items() if f is current), line
        pairs = []
        if labels:
            pos = 0
            while pos < len(labels):
                m = _LABEL.match(labels, pos)
                assert m, f"bad labels in {line!r}"
                pairs.append((m[1], _unescape(m[2])))
                pos = m.end()
        key = tuple(sorted(pairs))
        assert key not in current["samples"], f"sample twice: {line!r}"
        current["samples"][key] = float(value)
    for name, family in families.items():
        assert name.startswith("erq_"), name
        assert family["help"] and family["type"], name
        assert family["samples"], f"{name} has no samples"
        assert (family["type"] == "counter") == name.endswith("_total"), name
    return families


def value(families: dict, name: str, **labels: str) -> float:
    return families[name]["samples"][tuple(sorted(labels.items()))]


# ---- the endpoints -----------------------------------------------------------------------------
def test_healthz_says_ok_and_readyz_names_the_status(erq_factory):
    proc, port = admin_server(erq_factory)
    reply = http(port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok")
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    reply = http(port, "/readyz")
    assert (reply.status, reply.body) == (200, b"UP")
    # A graceful stop with an admin connection still open (idle) closes it and exits 0.
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as idle:
        assert proc.stop() == 0
        try:
            assert idle.recv(1) == b""
        except ConnectionResetError:
            pass  # still in the listen backlog when the listener closed: reset, not answered
    assert "Traceback" not in proc.read_log() and " ERROR " not in proc.read_log()


def test_readyz_is_503_while_quiescent_and_200_with_the_status_otherwise(erq_factory):
    proc, port = admin_server(erq_factory)
    c = proc.client()
    assert c.call(b"status QUIESCENT\r\n") == END
    reply = http(port, "/readyz")
    assert (reply.status, reply.body) == (503, b"QUIESCENT")
    assert http(port, "/healthz").status == 200  # alive, just not taking traffic
    families = parse_metrics(http(port, "/metrics").text)
    assert value(families, "erq_status", status="QUIESCENT") == 1
    assert value(families, "erq_status", status="UP") == 0
    assert c.call(b"status READONLY\r\n") == END
    reply = http(port, "/readyz")
    assert (reply.status, reply.body) == (200, b"READONLY")
    assert c.call(b"status UP\r\n") == END
    reply = http(port, "/readyz")
    assert (reply.status, reply.body) == (200, b"UP")


def _between(before: dict, after: dict, key: str, seen: object) -> None:
    """``seen`` (from /stats.json, read between two memcache ``stats``) fits them: equal when
    the field did not move, else within their range (the stats requests themselves count)."""
    a, b = before[key], after[key]
    if a == b:
        assert str(seen) == a, (key, seen, a)
    else:
        assert int(a) <= int(seen) <= int(b), (key, seen, a, b)


def test_stats_json_moves_with_memcache_traffic_and_matches_the_stats_command(erq_factory):
    proc, port = admin_server(erq_factory)
    start = http(port, "/stats.json")
    assert start.headers["content-type"] == "application/json"
    first = json.loads(start.body)
    c = proc.client()
    assert c.get("jobs+audit") == END  # a fanout child: its parent gets a "children" field
    for data in (b"one", b"two", b"three"):
        assert c.set("jobs", data) == STORED
    assert c.get("jobs") == b"VALUE jobs 0 3\r\none\r\nEND\r\n"
    assert c.get("empty") == END
    before = c.stats()
    doc = json.loads(http(port, "/stats.json").body)
    after = c.stats()
    # It moved, by exactly the traffic above.
    assert doc["cmd_set"] - first["cmd_set"] == 3
    assert doc["cmd_get"] - first["cmd_get"] == 3
    assert (doc["get_hits"], doc["get_misses"]) == (1, 2)
    assert (doc["curr_items"], doc["total_items"]) == (5, 6)  # 2 left in jobs, 3 in the child
    assert doc["queues"]["jobs"]["items"] == 2
    assert doc["queues"]["jobs+audit"]["total_items"] == 3
    assert doc["queues"]["jobs"]["children"] == "jobs+audit"
    assert isinstance(doc["cmd_set"], int) and doc["status"] == "UP"
    # The same fields as the memcache stats, with the same values.
    queues = doc.pop("queues")
    general = {k for k in before if not k.startswith("queue_") or k in doc}
    assert set(doc) == general
    for key, seen in doc.items():
        _between(before, after, key, seen)
    assert set(queues) == {"jobs", "jobs+audit", "empty"}
    for name, fields in queues.items():
        prefix = f"queue_{name}_"
        assert set(fields) == {k[len(prefix) :] for k in before if k.startswith(prefix)}
        for field, seen in fields.items():
            _between(before, after, prefix + field, seen)


def test_metrics_parse_and_agree_with_stats_json(erq_factory):
    proc, port = admin_server(erq_factory)
    c = proc.client()
    weird = 'we"ird\\q'  # a valid queue name whose label value must be escaped
    assert c.get("jobs+audit") == END
    assert c.set("jobs", b"abc") == STORED
    assert c.set(weird, b"x") == STORED
    assert c.get("jobs/open") == b"VALUE jobs/open 0 3\r\nabc\r\nEND\r\n"
    reply = http(port, "/metrics")
    assert reply.headers["content-type"] == PROMETHEUS
    families = parse_metrics(reply.text)
    doc = json.loads(http(port, "/stats.json").body)
    counters = {
        "erq_cmd_get_total": "cmd_get",
        "erq_cmd_set_total": "cmd_set",
        "erq_cmd_peek_total": "cmd_peek",
        "erq_get_hits_total": "get_hits",
        "erq_get_misses_total": "get_misses",
        "erq_bytes_read_total": "bytes_read",
        "erq_bytes_written_total": "bytes_written",
        "erq_connections_total": "total_connections",
        "erq_rejected_connections_total": "rejected_connections",
        "erq_added_items_total": "total_items",
        "erq_queue_creates_total": "queue_creates",
        "erq_queue_deletes_total": "queue_deletes",
        "erq_queue_expires_total": "queue_expires",
    }
    gauges = {
        "erq_curr_connections": "curr_connections",
        "erq_curr_items": "curr_items",
        "erq_bytes": "bytes",
        "erq_uptime_seconds": "uptime",
    }
    for name, field in {**counters, **gauges}.items():
        assert families[name]["type"] == ("counter" if name in counters else "gauge"), name
        if field not in ("bytes_read", "bytes_written", "uptime"):  # no memcache traffic between
            assert value(families, name) == doc[field], name
    assert (value(families, "erq_cmd_set_total"), value(families, "erq_get_hits_total")) == (2, 1)
    assert value(families, "erq_status", status="UP") == 1
    assert value(families, "erq_ready") == 1
    assert value(families, "erq_info", version=doc["version"], implementation=doc["implementation"])
    # Per queue: one family per numeric field, a sample per queue, labels escaped and read back.
    assert value(families, "erq_queue_items", queue="jobs+audit") == 1
    assert value(families, "erq_queue_items", queue=weird) == 1
    assert value(families, "erq_queue_open_transactions", queue="jobs") == 1
    assert families["erq_queue_added_items_total"]["type"] == "counter"
    # OpenMetrics names a counter's family without _total: no two families may share one.
    bare = [n.removesuffix("_total") if families[n]["type"] == "counter" else n for n in families]
    assert len(bare) == len(set(bare)), sorted(bare)
    queue_families = {n for n in families if n.startswith("erq_queue_")} - set(counters)
    numeric = {f for f, v in doc["queues"]["jobs"].items() if isinstance(v, int)}
    assert len(queue_families) == len(numeric) == len(doc["queues"]["jobs"]) - 1  # no children
    assert not any("children" in n for n in families)
    all_queues = {"jobs", "jobs+audit", weird}
    for name in queue_families:
        assert {dict(k)["queue"] for k in families[name]["samples"]} == all_queues, name
    # The general families are exactly the numeric stats fields (pid and time aside) and 3 more.
    general = {f for f, v in doc.items() if isinstance(v, int)} - {"pid", "time"}
    assert len(set(families) - queue_families) == len(general) + 3  # erq_info, _status, _ready


def test_head_gets_the_headers_of_get_and_no_body(erq_factory):
    _, port = admin_server(erq_factory)
    for path in ("/stats.json", "/metrics", "/healthz", "/nope"):
        get, head = http(port, path), http(port, path, "HEAD")
        assert head.body == b"", path
        assert head.status == get.status, path
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path in ("/healthz", "/nope"):  # the same body both times: the same length
            assert head.headers["content-length"] == get.headers["content-length"], path
        assert int(head.headers["content-length"]) > 0, path


def test_unknown_paths_get_404_other_methods_405_and_broken_requests_400(erq_factory):
    proc, port = admin_server(erq_factory)
    assert http(port, "/").status == 404
    assert http(port, "/stats").status == 404
    assert http(port, "/healthz?verbose=1").status == 200  # a query string is ignored
    # The absolute form (a request through a proxy: servers must accept it) and escapes.
    for target in (b"http://127.0.0.1:%d/healthz" % port, b"http://x/%68ealthz?a", b"/%68ealthz"):
        reply = Reply(send(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target))
        assert (reply.status, reply.body) == (200, b"ok"), target
    assert Reply(send(port, b"GET http://x HTTP/1.1\r\n\r\n")).status == 404  # path "/"
    for method in ("POST", "PUT", "DELETE", "get"):
        reply = http(port, "/healthz", method)
        assert reply.status == 405, method
        assert reply.headers["allow"] == "GET, HEAD"
    for request in (
        b"garbage\r\n\r\n",
        b"GET /healthz\r\n\r\n",  # HTTP/0.9 style: no version
        b"GET  /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1 extra\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\r\n\r\n",  # a TLS hello's first bytes
    ):
        assert Reply(send(port, request)).status == 400, request
    assert Reply(send(port, b"GET /healthz HTTP/2.0\r\n\r\n")).status == 505
    reply = Reply(send(port, b"HEAD /healthz HTTP/2.0\r\n\r\n"))  # HEAD: never a body
    assert (reply.status, reply.body) == (505, b"")
    assert int(reply.headers["content-length"]) > 0
    assert http(port, "/healthz").status == 200
    assert proc.client().call(b"version\r\n").startswith(b"VERSION ")


def test_a_request_with_a_body_gets_its_answer_not_a_reset(erq_factory):
    """A body is not read (nothing takes one): the server closed with it unread, the socket
    sent a reset, and a client still sending lost its answer (a POST of 1 MB got
    ConnectionResetError instead of its 405)."""
    _, port = admin_server(erq_factory)
    body = b"x" * 1_000_000
    for method, status in (("POST", 405), ("GET", 200)):
        head = f"{method} /healthz HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
        reply = Reply(send(port, head.encode() + body))
        assert reply.status == status, method
    chunked = b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = Reply(send(port, chunked))
    assert (reply.status, reply.headers["allow"]) == (405, "GET, HEAD")


def test_an_oversized_request_head_is_refused_and_the_port_stays_usable(erq_factory):
    proc, port = admin_server(erq_factory)
    request = b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 64_000 + b"\r\n\r\n"
    try:
        raw = send(port, request)
    except (ConnectionResetError, BrokenPipeError):
        raw = b""  # closed on us before or while we sent: also a refusal
    if raw:
        assert 400 <= Reply(raw).status < 500, raw[:200]
    assert http(port, "/healthz").status == 200
    assert proc.client().call(b"version\r\n").startswith(b"VERSION ")


def test_a_client_that_resets_after_its_request_leaves_no_traceback(erq_factory):
    """A client that sends a request and resets the connection (SO_LINGER 0) before the
    answer: the answer was written to the closed transport, and uvloop's RuntimeError was
    logged with a traceback (124 of 400 such requests)."""
    proc, port = admin_server(erq_factory)
    reset_on_close = struct.pack("ii", 1, 0)
    for path in ("/healthz", "/stats.json", "/metrics"):
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset_on_close)
                sock.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    assert http(port, "/healthz").status == 200
    assert proc.stop() == 0
    log = proc.read_log()
    assert "Traceback" not in log and " ERROR " not in log, log


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (Linux /proc: its socket inodes in LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_admin_port_zero_opens_no_listener(erq_factory):
    off = erq_factory(name="off")  # the fixture passes --admin-port 0
    assert _listening_ports(off.proc.pid) == {off.port}
    on, port = admin_server(erq_factory)
    assert _listening_ports(on.proc.pid) == {on.port, port}


@pytest.mark.parametrize("which", ["admin", "memcache"])
def test_a_taken_port_stops_the_start_with_one_log_line(erq_factory, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        admin_port = port if which == "admin" else free_port()
        proc = erq_factory(args=["--admin-port", str(admin_port)], start=False)
        if which == "memcache":
            proc.port = port
        proc.start(wait=False)
        code = proc.proc.wait(30)
        log = proc.read_log()
        assert code == 1, log
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "Traceback" not in log, log
        assert f"{which} " in errors[0] and f":{port}:" in errors[0], errors
    if which == "admin":
        with pytest.raises(OSError):
            RawClient(proc.port, timeout=1.0)  # the memcache port never opened
    else:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", admin_port), timeout=1.0).close()


# ---- in-process: what a subprocess cannot show -------------------------------------------------
def _run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await reader.read()
    writer.close()
    return raw


def test_readyz_says_starting_until_recovery_has_finished():
    from erq.admin import AdminServer

    state = SimpleNamespace(ready=False, status="UP")

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            request = b"GET /readyz HTTP/1.1\r\n\r\n"
            reply = Reply(await _exchange(port, request))
            assert (reply.status, reply.body) == (503, b"starting")
            assert Reply(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")).status == 200
            state.ready = True
            reply = Reply(await _exchange(port, request))
            assert (reply.status, reply.body) == (200, b"UP")
        finally:
            admin.close()

    _run(scenario)


def test_an_idle_or_dribbling_client_gets_408_and_is_closed():
    from erq.admin import AdminServer

    async def scenario() -> None:
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"), timeout=0.3)
        port = await admin.start("127.0.0.1", 0)
        try:
            # Idle: connects and sends nothing.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert Reply(await reader.read()).status == 408
            writer.close()
            # Dribbling: a byte at a time, never a whole head; the deadline is for the head.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            read = asyncio.ensure_future(reader.read())
            for byte in b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 10_000:
                if read.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)  # paces the client; the server's deadline ends it
            assert Reply(await read).status == 408
            writer.close()
            # The listener still answers.
            raw = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert Reply(raw).status == 200
        finally:
            admin.close()

    _run(scenario)


def test_past_the_limit_a_probe_takes_the_place_of_the_longest_idle_connection():
    # Stalled or idle clients must not lock the probes out: an orchestrator whose liveness
    # probe is refused restarts a healthy server.
    from erq.admin import AdminServer

    async def scenario() -> None:
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"), max_connections=2)
        port = await admin.start("127.0.0.1", 0)
        try:
            held = []
            for _ in range(2):  # two idle clients, accepted one after the other
                held.append(await asyncio.open_connection("127.0.0.1", port))
                while admin.connections < len(held):
                    await asyncio.sleep(0.001)
            raw = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert Reply(raw).status == 200  # answered, at the limit
            oldest_reader, _ = held[0]
            assert await asyncio.wait_for(oldest_reader.read(), 5) == b""  # closed for it
            reader, writer = held[1]  # the younger idle one is still served
            writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
            assert Reply(await asyncio.wait_for(reader.read(), 5)).status == 200
            for _, w in held:
                w.close()
            while admin.connections:
                await asyncio.sleep(0.001)
        finally:
            admin.close()

    _run(scenario)


class LoopPasses:
    """Counts the loop's passes while entered (``async with``): a task that adds one and
    yields, each pass."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopPasses:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def asked_and_not_reading(port: int):
    """A client that asked for /big with a small receive buffer, read the first bytes of the
    answer and no more: (reader, writer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /big HTTP/1.1\r\n\r\n")
    assert (await reader.read(100)).startswith(b"HTTP/1.1 200 OK")  # then no more reads
    return reader, writer


def test_past_the_limit_a_probe_takes_the_place_of_a_client_that_does_not_read_its_answer(
    monkeypatch,
):
    """Clients that ask for a document larger than the socket buffers hold and never read it
    held every admin slot until their 10 s deadline, and a probe meanwhile was refused (64
    such /metrics clients of a 4,000-queue server: the probes timed out, then were reset).
    Waiting on such a client is waiting on it as for its head: the probe takes its place."""
    from erq import admin as admin_module
    from erq.admin import TEXT, AdminServer

    big = b"x" * 16_000_000  # more than the socket buffers hold (tcp_wmem's 4 MiB)
    monkeypatch.setitem(admin_module.ROUTES, "/big", lambda state: (200, TEXT, big))

    async def read_all(reader: asyncio.StreamReader) -> bytes:
        out = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                out += chunk
        except ConnectionResetError:
            pass
        return out

    async def scenario() -> None:
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"), max_connections=2)
        port = await admin.start("127.0.0.1", 0)
        try:
            held = [await asked_and_not_reading(port), await asked_and_not_reading(port)]
            try:
                raw = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                raw = b"reset"
            assert raw.startswith(b"HTTP/1.1 200 OK"), raw  # answered, at the limit
            assert len(await read_all(held[0][0])) < len(big)  # closed for it
            whole = await read_all(held[1][0])  # the younger one still gets all of its answer
            assert whole.endswith(big) and len(whole) < len(big) + 200
            for _, writer in held:
                writer.close()
        finally:
            admin.close()

    _run(scenario)


def test_past_the_limit_a_probe_takes_the_place_of_a_client_whose_answer_is_being_made(
    monkeypatch,
):
    """When every connection's answer was being made (64 clients asking for /metrics of a
    large server at once), a probe was refused. Now the one whose answer has been in the
    making longest gives way; the others still get theirs."""
    from erq import admin as admin_module
    from erq.admin import TEXT, AdminServer

    made = asyncio.Event()
    asked = []

    async def slow(state):
        asked.append(state)
        await made.wait()
        return 200, TEXT, b"made"

    for path in ("/slow1", "/slow2"):  # two: the answers of one endpoint are made one at a time
        monkeypatch.setitem(admin_module.ROUTES, path, slow)

    async def scenario() -> None:
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"), max_connections=2)
        port = await admin.start("127.0.0.1", 0)
        try:
            held = []
            for path in (b"/slow1", b"/slow2"):  # one after the other
                held.append(await asyncio.open_connection("127.0.0.1", port))
                held[-1][1].write(b"GET %s HTTP/1.1\r\n\r\n" % path)
                while len(asked) < len(held):  # its answer is in the making
                    await asyncio.sleep(0.001)
            try:
                raw = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                raw = b"reset"
            assert raw.startswith(b"HTTP/1.1 200 OK"), raw
            made.set()
            try:
                oldest = await asyncio.wait_for(held[0][0].read(), 5)
            except ConnectionResetError:
                oldest = b""
            assert oldest == b""  # closed for the probe
            reply = Reply(await asyncio.wait_for(held[1][0].read(), 5))
            assert (reply.status, reply.body) == (200, b"made")
            for _, writer in held:
                writer.close()
        finally:
            admin.close()

    _run(scenario)


def test_clients_that_do_not_read_a_shared_document_do_not_each_hold_a_copy(monkeypatch):
    """The answer was made as one bytes, head and body, for each client: 64 clients that
    asked at once for /metrics of 4,000 queues (3.2 MB) and did not read it held a copy
    each, and the server's RSS grew from 61 MB to 275 MB. The body is now handed to the
    transport as it is: uvloop, the server's loop, keeps it without a copy."""
    import uvloop

    from erq import admin as admin_module
    from erq.admin import TEXT, AdminServer

    body = b"x" * 8_000_000

    async def big(state):
        return 200, TEXT, body

    monkeypatch.setitem(admin_module.ROUTES, "/big", big)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    async def scenario() -> None:
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"))
        port = await admin.start("127.0.0.1", 0)
        held = []
        try:
            before = rss()
            for _ in range(8):
                _reader, writer = await asked_and_not_reading(port)
                held.append(writer)
            grown = rss() - before
            assert grown < 3 * len(body), grown  # 8 copies were 8 times the body
        finally:
            for writer in held:
                writer.close()
            admin.close()

    uvloop.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_goes_out_a_piece_a_loop_pass_and_a_close_meanwhile_is_quiet(monkeypatch, loop):
    """A document was written whole to every client that asked for it: 3 MB of /metrics
    went into each socket at once (0.5-12 ms a write, the kernel's send buffer growing to
    take it all), and the clients that shared one document all got it in the same pass:
    clients flooding /metrics and not reading held memcache clients 0.2-1 s. Now each
    connection's answer goes out a piece a loop pass. A connection closed between its
    pieces (for a newer one, past the limit) ends quietly, as it did between head and
    answer (uvloop raised on the write to the closed transport, and the loop logged it)."""
    import uvloop

    from erq import admin as admin_module
    from erq.admin import SEND_PIECE, TEXT, AdminServer

    big = bytes(range(256)) * (3 * SEND_PIECE // 256 + 7)

    async def shared(state):
        return 200, TEXT, big

    monkeypatch.setitem(admin_module.ROUTES, "/big", shared)
    passes = LoopPasses()
    writes: list[tuple[int, int, int]] = []  # (connection, loop pass, bytes)
    write = asyncio.StreamWriter.write

    abort_after_first_piece = [None]

    def recorded(self, data):
        if bytes(data[:4]) != b"GET ":  # the server's, not the clients' requests
            writes.append((id(self), passes.count, len(data)))
            if abort_after_first_piece[0] and len(writes) == 2:
                abort_after_first_piece[0](self)
        return write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", recorded)
    logged: list[dict] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: logged.append(ctx))
        admin = AdminServer(SimpleNamespace(ready=True, status="UP"), max_connections=3)
        port = await admin.start("127.0.0.1", 0)
        try:
            async with passes:
                replies = await asyncio.gather(
                    *(_exchange(port, b"GET /big HTTP/1.1\r\n\r\n") for _ in range(3))
                )
                for raw in replies:
                    assert Reply(raw).body == big
                mine = {}
                for conn, when, size in writes:
                    assert size <= SEND_PIECE
                    mine.setdefault(conn, []).append(when)
                assert len(mine) == 3
                for whens in mine.values():  # a piece a pass, the body in 4 pieces
                    assert len(whens) >= 4 and len(set(whens)) == len(whens), whens
                # A connection closed (as for a newer one past the limit) after its first piece.
                writes.clear()
                cut = asyncio.get_running_loop().call_soon
                abort_after_first_piece[0] = lambda writer: cut(writer.transport.abort)
                try:
                    raw = await _exchange(port, b"GET /big HTTP/1.1\r\n\r\n")
                except ConnectionResetError:
                    raw = b""
                assert len(raw) < len(big) and len(writes) == 2  # its head and one piece
                while admin.connections:
                    await asyncio.sleep(0.001)
        finally:
            admin.close()
        assert not logged, logged

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(scenario(), 30))


def test_the_metrics_text_is_made_in_the_slices_not_on_a_thread(monkeypatch):
    """/metrics' text was made on a worker thread, which takes the GIL from the loop in 5 ms
    turns: every callback of every connection waited for it, and a flood of /metrics
    requests of 4,000 queues held memcache clients 0.25-1 s. It is now made on the loop,
    in the slices that gather its numbers."""
    from erq import admin as admin_module
    from erq.admin import AdminServer

    queues, state = sliced_server_state(monkeypatch)
    for i in range(300):
        queues.add(f"q{i:04d}", b"x", 0, 0)
    passes = LoopPasses()
    made_at: list[int] = []  # the loop pass of each piece of the text
    pieces = admin_module.metrics_pieces

    def recorded(*args):
        for piece in pieces(*args):
            made_at.append(passes.count)
            yield piece

    monkeypatch.setattr(admin_module, "metrics_pieces", recorded)

    async def no_thread(*args, **kwargs):
        raise AssertionError("made on a thread")

    monkeypatch.setattr(admin_module.asyncio, "to_thread", no_thread)

    async def scenario() -> str:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            async with passes:
                reply = Reply(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        finally:
            admin.close()
        assert reply.status == 200
        return reply.body.decode()

    text = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert text.count('erq_queue_items{queue="q') == 300
    assert len(set(made_at)) >= 300  # a pass (SLICE 0) after every piece


def test_a_failing_stats_source_answers_500_and_the_listener_stays():
    from erq.admin import AdminServer

    class Broken:
        ready = True
        status = "UP"

        @property
        def counters(self):
            raise RuntimeError("broken on purpose")

    async def scenario() -> None:
        admin = AdminServer(Broken())
        port = await admin.start("127.0.0.1", 0)
        try:
            raw = await _exchange(port, b"GET /stats.json HTTP/1.1\r\n\r\n")
            assert Reply(raw).status == 500
            raw = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert Reply(raw).status == 200
        finally:
            admin.close()

    _run(scenario)


def sliced_server_state(monkeypatch):
    """A ready server's queues and state, in process, with no queue yet; sliced work gives
    the loop a pass after every queue."""
    from erq import sliced
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    monkeypatch.setattr(sliced, "SLICE", 0.0)
    queues = QueueCollection(Config(), None)
    state = ServerState(Config(), queues, None)
    state.ready = True
    return queues, state


def test_a_scrape_of_many_queues_lets_the_loop_serve_others_meanwhile(monkeypatch):
    """With thousands of queues a /metrics or /stats.json document is megabytes: its numbers
    are gathered and its text made a slice of time at a time, so the loop serves
    its clients meanwhile (an audit: 4,000 queues held every memcache client ~0.7 s per
    scrape). A queue deleted during the scrape is left out, not an error."""
    from erq.admin import AdminServer

    queues, state = sliced_server_state(monkeypatch)
    names = [f"q{i:04d}" for i in range(300)]
    for name in names:
        queues.add(name, b"x", 0, 0)

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 50:
                    queues.delete("q0299")
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            reply = Reply(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
            assert reply.status == 200
            assert ticks >= 250, ticks  # served between the queues, not after all of them
            lines = reply.body.decode().splitlines()
            items = [line for line in lines if line.startswith("erq_queue_items{")]
            assert len(items) == 299 and 'queue="q0299"' not in reply.body.decode()
            before = ticks
            reply = Reply(await _exchange(port, b"GET /stats.json HTTP/1.1\r\n\r\n"))
            assert reply.status == 200 and ticks - before >= 250
            assert sorted(json.loads(reply.body)["queues"]) == names[:-1]
        finally:
            task.cancel()
            admin.close()

    _run(scenario)


def test_the_stats_json_text_is_made_a_queue_at_a_time_in_the_slices(monkeypatch):
    """/stats.json's text was one json.dumps of the whole document on a worker thread, which
    holds the GIL, and so the loop, all along (a 28 ms pause of the loop for 4,000 queues
    where its slices of numbers took 2 ms). Each queue is now made text with its numbers."""
    from erq import admin as admin_module
    from erq.admin import AdminServer

    queues, state = sliced_server_state(monkeypatch)
    for i in range(300):
        queues.add(f"q{i:04d}", b"x", 0, 0)
    passes = LoopPasses()
    dumped = []  # (loop passes so far, what one json.dumps made text of)
    dumps = json.dumps
    monkeypatch.setattr(
        admin_module.json,
        "dumps",
        lambda obj, **kw: dumped.append((passes.count, obj)) or dumps(obj, **kw),
    )

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            async with passes:
                reply = Reply(await _exchange(port, b"GET /stats.json HTTP/1.1\r\n\r\n"))
        finally:
            admin.close()
        doc = json.loads(reply.body)
        assert sorted(doc["queues"]) == [f"q{i:04d}" for i in range(300)]
        assert doc["queues"]["q0007"]["items"] == 1 and doc["curr_items"] == 300

    _run(scenario)
    nested = [obj for _, obj in dumped if isinstance(obj, dict) and "queues" in obj]
    assert not nested  # never the whole document at once
    assert len({when for when, obj in dumped if isinstance(obj, dict)}) >= 250


def test_a_scrape_in_flight_when_the_admin_port_closes_stops_and_logs_nothing(monkeypatch):
    """At a graceful stop a /stats.json being made went on reading the queues while their
    journals closed, and the loop's end cancelled its handler, which asyncio logged as an
    "Exception in callback ... CancelledError" traceback. close() now cancels the handlers,
    and a handler cancelled so ends quietly."""
    from erq import admin as admin_module
    from erq.admin import AdminServer

    queues, state = sliced_server_state(monkeypatch)
    for i in range(300):
        queues.add(f"q{i:04d}", b"x", 0, 0)
    looked_at = []
    each_queue_stats = admin_module.each_queue_stats

    def counted(collection):
        for entry in each_queue_stats(collection):
            looked_at.append(entry)
            yield entry

    monkeypatch.setattr(admin_module, "each_queue_stats", counted)
    logged = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: logged.append(context))
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stats.json HTTP/1.1\r\n\r\n")
        while len(looked_at) < 10:
            await asyncio.sleep(0)
        admin.close()
        seen = len(looked_at)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(looked_at) == seen  # the document stopped with the close
        assert await reader.read() == b""
        writer.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert logged == []


def test_clients_asking_at_once_share_one_document_made_after_their_request(monkeypatch):
    """Each client asking at once for /stats.json (or /metrics) had its own document made: 64
    at once of a 4,000-queue server held memcache clients 0.1-0.5 s a request for 6 s. The
    requests that come while one is being made now share the next, and only that: what a
    client did before it asked is in its answer."""
    from erq import admin as admin_module
    from erq.admin import AdminServer

    queues, state = sliced_server_state(monkeypatch)
    for i in range(1000):
        queues.add(f"q{i:04d}", b"x", 0, 0)
    made = []
    general_stats = admin_module.general_stats
    monkeypatch.setattr(admin_module, "general_stats", lambda s: made.append(1) or general_stats(s))
    request = b"GET /stats.json HTTP/1.1\r\n\r\n"

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            first = asyncio.ensure_future(_exchange(port, request))
            while not made:  # the first document is being made
                await asyncio.sleep(0)
            queues.add("late", b"x", 0, 0)
            rest = [asyncio.ensure_future(_exchange(port, request)) for _ in range(8)]
            replies = [Reply(raw) for raw in await asyncio.gather(first, *rest)]
        finally:
            admin.close()
        assert [reply.status for reply in replies] == [200] * 9
        assert len(made) == 2
        docs = [json.loads(reply.body) for reply in replies]
        assert docs[0]["curr_items"] == 1000 and "late" not in docs[0]["queues"]
        for doc in docs[1:]:
            assert doc == docs[1] and doc["curr_items"] == 1001 and "late" in doc["queues"]

    _run(scenario)


def test_a_head_of_bare_lf_lines_is_answered_and_a_head_of_many_lines_has_a_limit():
    """RFC 9112 lets a server take a bare LF for CRLF (``printf 'GET /healthz HTTP/1.0\\n\\n' |
    nc``): it used to wait for its 10 s timeout and a 408. The head's limit holds across its
    lines, not only within one."""
    from erq.admin import MAX_HEAD, AdminServer

    state = SimpleNamespace(ready=True, status="UP")

    async def scenario() -> None:
        admin = AdminServer(state)
        port = await admin.start("127.0.0.1", 0)
        try:
            for request in (b"GET /healthz HTTP/1.0\n\n", b"GET /readyz HTTP/1.1\nHost: x\n\n"):
                reply = Reply(await asyncio.wait_for(_exchange(port, request), 5))
                assert reply.status == 200, request
            many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEAD // 8 + 1) + b"\r\n"
            assert Reply(await _exchange(port, many)).status == 431
            reply = Reply(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
            assert (reply.status, reply.body) == (200, b"ok")
        finally:
            admin.close()

    _run(scenario)


def test_the_date_header_is_the_imf_fixdate_email_utils_would_give():
    """``http_date`` stands in for ``email.utils.formatdate(usegmt=True)``: the same text for
    every day of a leap year and its edges, and English day and month names in any locale."""
    from erq.admin import http_date

    start = 1_704_067_200  # 2024-01-01 00:00:00 UTC, a leap year
    moments = [0, 951_782_400, 2_147_483_647, 4_102_444_799.9]
    moments += [start + day * 86_400 + day * 3_607 % 86_400 for day in range(367)]
    for t in moments:
        assert http_date(t) == email.utils.formatdate(t, usegmt=True), t
