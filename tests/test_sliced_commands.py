"""Commands whose work grows with the data run a slice of loop time at a time, the loop serving
other connections in between: ``stats`` and ``dump_stats`` over thousands of queues (4,000 held
every client ~0.1 s compiled, ~0.4 s pure). The connection's later requests wait, as behind a
blocked get, and their replies come after its own. Both implementations.

Each check runs a server in its own process (the build is chosen at import) with its clients on
the server's loop, over real sockets, so that what the loop did between two replies can be seen.
Where the exact shape matters, erq.sliced.SLICE is set to 0: each pass of the loop then does
one queue.
"""

from __future__ import annotations

from pathlib import Path

from support import run_script

COMMON = r"""
import asyncio, json, logging, socket, struct, sys
import erq.server as server_module
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
    queue_count = 4000 if case == "real_slices" else 300
    if case != "real_slices":
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
        result["passes_after_version"] = ticks
        result["queue_lines"] = reply.count("STAT queue_q")
        result["items_lines"] = reply.count("_total_items 1\r\n")
        result["ends_once"] = reply.endswith("\r\nEND\r\n") and reply.count("END\r\n") == 1
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
        result["received_before_leaving"] = len(a_reader._buffer)
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
    if case != "shutdown":
        await stop(server)
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""
)


def run_stats(impl: str, tmp_path: Path, case: str) -> dict:
    config = tmp_path / "erq.toml"
    config.write_text("[queues.default]\njournal = false\n")  # quick to make 4,000 of
    return run_script(impl, STATS_SCRIPT, str(tmp_path / "data"), case, str(config))


FIELDS = 16  # a queue's stats fields (PROTOCOL.md §8), none of them `children` here


def test_other_clients_are_answered_while_a_stats_over_4000_queues_runs(impl, tmp_path):
    """The default slice (a few ms): a `version` sent on another connection once the server
    has read a `stats` over 4,000 queues is answered before the stats, which then comes
    whole."""
    result = run_stats(impl, tmp_path, "real_slices")
    assert result["version"].startswith("VERSION "), result
    assert result["written_when_version_answered"] < 100, result  # the stats came after it
    assert result["passes_after_version"] >= 3, result
    assert result["queue_lines"] == 4000 * FIELDS and result["items_lines"] == 4000, result
    assert result["ends_once"] and result["errors"] == [], result


def test_the_loop_serves_others_between_the_queues_of_a_stats(impl, tmp_path):
    result = run_stats(impl, tmp_path, "others_served")
    assert result["written_when_version_answered"] < 100, result
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


def test_a_queue_deleted_during_a_stats_is_left_out(impl, tmp_path):
    result = run_stats(impl, tmp_path, "deleted")
    assert result["delete"] == "DELETED\r\n", result
    assert result["stats_queues"] == 299 and not result["stats_mentions_it"], result
    assert result["stats_well_formed"], result
    assert result["dump_queues"] == 299 and not result["dump_mentions_it"], result
    assert result["errors"] == [], result


def test_a_client_that_leaves_during_a_stats_ends_it_and_what_it_pipelined(impl, tmp_path):
    result = run_stats(impl, tmp_path, "disconnect")
    assert result["blocked_when_it_left"] and result["received_before_leaving"] == 0, result
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
