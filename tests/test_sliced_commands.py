"""Commands whose work grows with the data run a slice of loop time at a time, the loop serving
other connections in between: ``stats`` and ``dump_stats`` over thousands of queues (4,000 held
every client ~0.15 s compiled, ~0.4 s pure), ``flush_expired`` and ``flush_all_expired`` over
deep queues of expired items (200,000: ~0.1 s compiled, ~2.7 s pure). The connection's later
requests wait, as behind a blocked get, and their replies come after its own. Both
implementations.

Each check runs a server in its own process (the build is chosen at import) with its clients on
the server's loop, over real sockets, so that what the loop did between two replies can be seen.
Where the exact shape matters, erq.sliced.SLICE is set to 0: each pass of the loop then does
one queue (or one batch of expired items).
"""

from __future__ import annotations

from pathlib import Path

from support import run_script

COMMON = r"""
import asyncio, json, logging, socket, struct, sys
import erq.server as server_module
from erq import __version__
erq_version = __version__.encode()
from erq.clock import now_ms
from erq.config import load_config

errors = []


class Errors(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())


logging.getLogger().addHandler(Errors())


async def start(data_dir, config=None):
    server = server_module.Server(
        load_config(config, cli={"port": 0, "admin_port": 0, "data_dir": data_dir})
    )
    await server.start()
    server._sweeper.cancel()  # only the commands remove expired items here
    return server


async def connect(server):
    return await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 24)


async def passes(n):
    for _ in range(n):
        await asyncio.sleep(0)


def reset(writer):
    sock = writer.get_extra_info("socket")  # a reset, not a FIN (a FIN is a half-close)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def session_of_sock(server, sock):
    port = sock.getsockname()[1]
    for proto in server.state.connections:
        if proto.transport.get_extra_info("peername")[1] == port:
            return proto.session


def session_of(server, writer):
    port = writer.get_extra_info("sockname")[1]
    for proto in server.state.connections:
        if proto.transport.get_extra_info("peername")[1] == port:
            return proto.session


async def stop(server):
    server.request_shutdown("test")
    await server.shutdown()
"""

STATS_SCRIPT = (
    COMMON
    + r"""
import erq.sliced


async def main(data_dir, case, config):
    queue_count = {"real_slices": 4000, "unread": 12000, "unread_shutdown": 12000}.get(case, 300)
    if case not in ("real_slices", "unread", "unread_shutdown"):
        erq.sliced.SLICE = 0.0  # a pass of the loop after every queue
    server = await start(data_dir, config)
    queues = server.state.queues
    for i in range(queue_count):
        queues.add(f"q{i:04d}", b"x", 0, 0, None)
    a_reader, a_writer = await connect(server)
    b_reader, b_writer = await connect(server)
    result = {}
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    if case in ("real_slices", "others_served"):
        a_writer.write(b"stats\r\n")
        await passes(3)  # the server has read the stats
        b_writer.write(b"version\r\n")
        result["version"] = (await b_reader.readline()).decode()
        # What the server had sent by then: the version, not yet the stats.
        result["written_when_version_answered"] = server.state.counters.bytes_written
        task = asyncio.create_task(ticker())
        reply = (await a_reader.readuntil(b"END\r\n")).decode()
        task.cancel()
        result["stats_bytes"] = len(reply)
        result["passes_after_version"] = ticks
        result["queue_lines"] = reply.count("STAT queue_q")
        result["items_lines"] = reply.count("_total_items 1\r\n")
        result["ends_once"] = reply.endswith("\r\nEND\r\n") and reply.count("END\r\n") == 1
    elif case in ("unread", "unread_shutdown"):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await loop.sock_sendall(sock, b"stats\r\nversion\r\n")
        session = None
        for _ in range(2000):  # until the reply waits for the client
            await asyncio.sleep(0.001)
            session = session or session_of_sock(server, sock)
            if session is not None and session.blocked_on_output:
                break
        result["waits_for_the_client"] = session.blocked_on_output
        await asyncio.sleep(0.05)
        proto = next(p for p in server.state.connections if p.session is session)
        result["held"] = proto.transport.get_write_buffer_size() + sum(map(len, session.out))

        async def read_all():
            reply = b""
            while not reply.endswith(b"VERSION " + erq_version + b"\r\n"):
                part = await loop.sock_recv(sock, 1 << 20)
                if not part:
                    break
                reply += part
            return reply

        if case == "unread_shutdown":  # the stop finishes the reply; the client reads it all
            reading = asyncio.create_task(read_all())
            await stop(server)
            reply = await reading
        else:
            reply = await read_all()
        sock.close()
        result["stats_bytes"] = len(reply)
        result["items_lines"] = reply.count(b"_total_items 1\r\n")
        result["ends_once"] = reply.count(b"\r\nEND\r\n") == 1
        result["version_after_it"] = reply.endswith(b"END\r\nVERSION " + erq_version + b"\r\n")
        result["ends_with_end"] = reply.endswith(b"\r\nEND\r\n")
    elif case == "pipelined":
        a_writer.write(b"stats\r\ndump_stats\r\nget late\r\n")
        await passes(20)  # well inside the stats: another client adds to late
        b_writer.write(b"set late 0 0 4\r\nlate\r\n")
        result["set"] = (await b_reader.readline()).decode()
        stats = (await a_reader.readuntil(b"END\r\n")).decode()
        dump = (await a_reader.readuntil(b"END\r\n")).decode()
        result["stats_queues"] = stats.count("_total_items ")
        result["stats_first_line"] = stats.split("\r\n")[0].split(" ")[1]
        result["dump_queues"] = dump.count("queue '")
        result["dump_first_line"] = dump.split("\r\n")[0]
        result["get"] = (await a_reader.readuntil(b"END\r\n")).decode()
    elif case == "deleted":
        a_writer.write(b"stats\r\ndump_stats\r\n")
        await passes(20)
        b_writer.write(b"delete q0299\r\n")
        result["delete"] = (await b_reader.readline()).decode()
        stats = (await a_reader.readuntil(b"END\r\n")).decode()
        dump = (await a_reader.readuntil(b"END\r\n")).decode()
        result["stats_queues"] = stats.count("_total_items ")
        result["stats_mentions_it"] = "q0299" in stats
        result["stats_well_formed"] = all(
            line.startswith("STAT ") for line in stats.split("\r\n")[:-2]
        )
        result["dump_queues"] = dump.count("queue '")
        result["dump_mentions_it"] = "q0299" in dump
    elif case == "disconnect":
        a_writer.write(b"stats\r\nset after 0 0 1\r\nx\r\n")
        await passes(20)
        session = session_of(server, a_writer)
        result["blocked_when_it_left"] = session is not None and session.blocked is not None
        result["answered_before_leaving"] = b"END\r\n" in a_reader._buffer
        reset(a_writer)
        for _ in range(200):
            if session_of(server, a_writer) is None and session.blocked is None:
                break
            await asyncio.sleep(0.001)
        result["blocked_after"] = session.blocked is not None
        await passes(queue_count)  # what the stats had left would have run by now
        b_writer.write(b"version\r\nstats\r\n")
        result["version"] = (await b_reader.readline()).decode()
        stats = (await b_reader.readuntil(b"END\r\n")).decode()
        result["curr_connections"] = stats.split("STAT curr_connections ")[1].split("\r")[0]
        result["after_exists"] = "after" in queues
    elif case == "half_close":
        a_writer.write(b"stats\r\nversion\r\n")
        a_writer.write_eof()
        reply = (await a_reader.read()).decode()  # the whole reply, then the end of the stream
        result["queue_lines"] = reply.count("_total_items 1\r\n")
        result["version_after_it"] = reply.split("END\r\n", 1)[1].startswith("VERSION ")
    elif case == "shutdown":
        a_writer.write(b"stats\r\nversion\r\n")
        await passes(20)
        await stop(server)
        reply = (await a_reader.read()).decode()  # the whole reply, then the end of the stream
        result["queue_lines"] = reply.count("_total_items 1\r\n")
        result["version_after_it"] = reply.split("END\r\n", 1)[1].startswith("VERSION ")
    result["errors"] = errors
    if case not in ("shutdown", "unread_shutdown"):
        await stop(server)
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""
)


def run_stats(impl: str, tmp_path: Path, case: str) -> dict:
    config = tmp_path / "erq.toml"
    # quick to make 4,000 of; 12,000 for one case
    config.write_text("[server]\nmax_queues = 20000\n[queues.default]\njournal = false\n")
    return run_script(impl, STATS_SCRIPT, str(tmp_path / "data"), case, str(config))


FIELDS = 17  # a queue's stats fields (PROTOCOL.md §8, and journal_sync_errors), no `children` here


def test_other_clients_are_answered_while_a_stats_over_4000_queues_runs(impl, tmp_path):
    """The default slice (a few ms): a `version` sent on another connection once the server
    has read a `stats` over 4,000 queues is answered before the stats, which then comes
    whole."""
    result = run_stats(impl, tmp_path, "real_slices")
    assert result["version"].startswith("VERSION "), result
    # Only part of the stats had gone out (each slice's part goes as it is made).
    assert result["written_when_version_answered"] < result["stats_bytes"], result
    assert result["passes_after_version"] >= 3, result
    assert result["queue_lines"] == 4000 * FIELDS and result["items_lines"] == 4000, result
    assert result["ends_once"] and result["errors"] == [], result


def test_the_loop_serves_others_between_the_queues_of_a_stats(impl, tmp_path):
    result = run_stats(impl, tmp_path, "others_served")
    assert result["written_when_version_answered"] < result["stats_bytes"] // 10, result
    # A slice of 0 s: a pass of the loop per queue, ~280 of them after the version.
    assert result["passes_after_version"] >= 250, result
    assert result["queue_lines"] == 300 * FIELDS and result["items_lines"] == 300, result


def test_requests_pipelined_behind_a_stats_run_after_it_and_are_answered_in_order(impl, tmp_path):
    """`stats`, `dump_stats`, `get late` in one write; while the stats runs another client
    adds an item to `late`: the get, which waited for the stats and the dump, finds it."""
    result = run_stats(impl, tmp_path, "pipelined")
    assert result["set"] == "STORED\r\n", result
    assert result["stats_first_line"] == "pid", result
    assert result["stats_queues"] == 300, result  # late came after it began: not in it
    assert result["dump_first_line"] == "queue 'late' {", result
    assert result["dump_queues"] == 301, result
    assert result["get"] == "VALUE late 0 4\r\nlate\r\nEND\r\n", result


def test_a_stats_reply_its_client_does_not_read_holds_about_the_output_budget(impl, tmp_path):
    """Each slice's part goes out as it is made and the rest waits for the client, as a get's
    values do: a stats of 12,000 queues (~6 MB) that nobody reads holds ~OUT_BUDGET, not the
    whole reply (200 clients each sending one stats over 4,096 queues held 326 MB)."""
    result = run_stats(impl, tmp_path, "unread")
    assert result["waits_for_the_client"], result
    assert result["stats_bytes"] > 5_000_000, result
    assert result["held"] < 3 << 20, result  # ~0.5 MB; 3.6 MB when the reply was made whole
    assert result["items_lines"] == 12000 and result["ends_once"], result
    assert result["errors"] == [], result


def test_a_stats_reply_waiting_for_its_client_at_shutdown_is_sent_whole(impl, tmp_path):
    """The stop finishes the reply and gives the client its time to read it (it was cut off
    mid-line, with no END). What the client pipelined behind a reply it had not taken is
    dropped unrun, as behind any such reply (a get among it would take an item)."""
    result = run_stats(impl, tmp_path, "unread_shutdown")
    assert result["waits_for_the_client"], result
    assert result["items_lines"] == 12000 and result["ends_once"], result
    assert result["ends_with_end"] and not result["version_after_it"], result
    assert result["errors"] == [], result


def test_a_queue_deleted_during_a_stats_is_left_out(impl, tmp_path):
    result = run_stats(impl, tmp_path, "deleted")
    assert result["delete"] == "DELETED\r\n", result
    assert result["stats_queues"] == 299 and not result["stats_mentions_it"], result
    assert result["stats_well_formed"], result
    assert result["dump_queues"] == 299 and not result["dump_mentions_it"], result
    assert result["errors"] == [], result


def test_a_client_that_leaves_during_a_stats_ends_it_and_what_it_pipelined(impl, tmp_path):
    result = run_stats(impl, tmp_path, "disconnect")
    assert result["blocked_when_it_left"] and not result["answered_before_leaving"], result
    assert result["blocked_after"] is False, result
    assert result["version"].startswith("VERSION "), result
    assert result["curr_connections"] == "1", result
    assert result["after_exists"] is False, result  # the set behind the stats never ran
    assert result["errors"] == [], result


def test_a_client_that_shuts_its_side_during_a_stats_gets_it_and_what_followed(impl, tmp_path):
    result = run_stats(impl, tmp_path, "half_close")
    assert result["queue_lines"] == 300, result
    assert result["version_after_it"], result
    assert result["errors"] == [], result


def test_a_stats_in_progress_at_shutdown_is_answered_whole_with_what_follows(impl, tmp_path):
    result = run_stats(impl, tmp_path, "shutdown")
    assert result["queue_lines"] == 300, result
    assert result["version_after_it"], result
    assert result["errors"] == [], result


FLUSH_SCRIPT = (
    COMMON
    + r"""
from erq.journal.journal import QueueJournal
from erq.journal_api import JournalError

DEEP = 200_000


async def main(data_dir, case):
    server = await start(data_dir)
    queues = server.state.queues
    names = ["deep"] if case != "all" else ["deep1", "deep2", "deep3", "deep4"]
    per_queue = DEEP // len(names)
    expiry = now_ms() + 50
    for name in names:
        for _ in range(per_queue):
            queues.add(name, b"x", 0, expiry, None)
        queues.add(name, b"live", 0, 0, None)  # behind them: kept
    await asyncio.sleep(0.1)
    left = lambda: sum(queues.get(name).items for name in names)
    a_reader, a_writer = await connect(server)
    b_reader, b_writer = await connect(server)
    request = b"flush_all_expired\r\n" if case == "all" else b"flush_expired deep\r\n"
    result = {}
    if case in ("flush", "all"):
        a_writer.write(request)
        await passes(3)  # the server has read it
        b_writer.write(b"version\r\n")
        result["version"] = (await b_reader.readline()).decode()
        result["left_when_version_answered"] = left()
        result["reply"] = (await a_reader.readline()).decode()
    elif case == "disconnect":
        a_writer.write(request)
        await passes(3)
        reset(a_writer)
        for _ in range(200):
            if session_of(server, a_writer) is None:
                break
            await asyncio.sleep(0.001)
        await passes(10)
        result["left_after_it_left"] = left()
        await passes(DEEP // 256)  # what it had left would have run by now
        result["left_later"] = left()
        b_writer.write(request)
        result["reply"] = (await b_reader.readline()).decode()
    elif case == "shutdown":
        a_writer.write(request + b"version\r\n")
        await passes(3)
        await stop(server)
        result["reply"] = (await a_reader.read()).decode()
    elif case == "journal_error":
        real_remove = QueueJournal.remove
        removals = 0

        def remove(journal, *args):
            nonlocal removals
            removals += 1
            if removals > 50_000:
                raise JournalError("no space left on the device (injected)")
            return real_remove(journal, *args)

        QueueJournal.remove = remove
        a_writer.write(request + b"version\r\n")
        result["reply"] = (await a_reader.readline()).decode()
        result["next"] = (await a_reader.readline()).decode()
        result["left"] = left()
        QueueJournal.remove = real_remove
    if case != "shutdown":
        a_writer.close()
        await stop(server)
    # What the journal says: a restart finds the live items and what was not removed.
    server = await start(data_dir)
    queues = server.state.queues
    result["after_restart"] = left()
    result["expired_after_restart"] = sum(
        queues.queue_stats(name)["expired_items"] for name in names
    )
    reader, writer = await connect(server)
    writer.write(b"get " + names[0].encode() + b"\r\n")
    result["get_after_restart"] = (await reader.readuntil(b"END\r\n")).decode()
    result["errors"] = [e for e in errors if "injected" not in e]
    await stop(server)
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
)


def run_flush(impl: str, tmp_path: Path, case: str) -> dict:
    return run_script(impl, FLUSH_SCRIPT, str(tmp_path / "data"), case, timeout=120.0)


DEEP = 200_000  # the script's


def test_flush_expired_over_200000_items_is_sliced_and_survives_a_restart(impl, tmp_path):
    result = run_flush(impl, tmp_path, "flush")
    # Another client was answered while most of the expired items were still there.
    assert result["version"].startswith("VERSION "), result
    assert 0 < result["left_when_version_answered"] - 1 < DEEP, result
    assert result["reply"] == "200000\r\n", result
    # Every removal was journaled: the restart finds the live item only.
    assert result["after_restart"] == 1 and result["expired_after_restart"] == 0, result
    assert result["get_after_restart"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert result["errors"] == [], result


def test_flush_all_expired_over_deep_queues_is_sliced_and_counts_them_all(impl, tmp_path):
    result = run_flush(impl, tmp_path, "all")
    assert 0 < result["left_when_version_answered"] - 4 < DEEP, result
    assert result["reply"] == "200000\r\n", result
    assert result["after_restart"] == 4 and result["expired_after_restart"] == 0, result
    assert result["get_after_restart"] == "VALUE deep1 0 4\r\nlive\r\nEND\r\n", result


def test_a_client_that_leaves_during_flush_expired_stops_it_and_loses_nothing(impl, tmp_path):
    result = run_flush(impl, tmp_path, "disconnect")
    left = result["left_after_it_left"]
    assert 1 < left < DEEP + 1, result  # it stopped part way
    assert result["left_later"] == left, result
    assert result["reply"] == f"{left - 1}\r\n", result  # the rest, counted once
    assert result["after_restart"] == 1, result
    assert result["get_after_restart"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert result["errors"] == [], result


def test_flush_expired_in_progress_at_shutdown_finishes_and_answers(impl, tmp_path):
    result = run_flush(impl, tmp_path, "shutdown")
    assert result["reply"].startswith("200000\r\nVERSION "), result
    assert result["after_restart"] == 1, result
    assert result["errors"] == [], result


def test_a_journal_error_part_way_through_flush_expired_answers_server_error(impl, tmp_path):
    """The removals journaled before the error stand; the item that could not be journaled,
    and those after it, stay (as the one-call flush_expired did)."""
    result = run_flush(impl, tmp_path, "journal_error")
    assert result["reply"] == "SERVER_ERROR no space left on the device (injected)\r\n", result
    assert result["next"].startswith("VERSION "), result
    assert result["left"] == DEEP + 1 - 50_000, result
    assert result["after_restart"] == DEEP + 1 - 50_000, result
    assert result["errors"] == [], result
