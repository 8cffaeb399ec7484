"""A get that meets many expired items at its queue's head removes them EXPIRY_BATCH at a
time and gives the loop back in between, instead of holding every client for as long as
they take (a million items that expired together while the server was down took seconds,
~10 us each in the pure-Python build). Both implementations.

The queue-level checks call a Queue directly; the server-level ones run a server in its own
process (the build is chosen at import) with clients on its loop, so that what the loop did
between two replies can be seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import impl_module
from support import run_script


def test_a_fetch_removes_one_batch_of_expired_items_at_a_time(impl):
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    batch = queue_mod.EXPIRY_BATCH
    now = [1_000]
    queue = queue_mod.Queue("q", QueueConfig(), None, clock=lambda: now[0])
    for _ in range(2 * batch + 10):
        queue.add(b"old", 0, 1_500)
    queue.add(b"live", 0, 0)
    now[0] = 2_000
    for left in (batch + 11, 11):
        with pytest.raises(queue_mod.ExpiryBacklog):
            queue.take(False)
        assert queue.items == left  # the batch removed stays removed; nothing handed out
    assert queue.take(False).data == b"live"  # the last 10, then the live item
    assert queue.expired_items == 2 * batch + 10 and queue.items == 0
    assert queue.take(False) is None


def test_a_batch_that_ends_at_a_live_item_hands_it_out(impl):
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    batch = queue_mod.EXPIRY_BATCH
    now = [1_000]
    queue = queue_mod.Queue("q", QueueConfig(), None, clock=lambda: now[0])
    for _ in range(batch):
        queue.add(b"old", 0, 1_500)
    queue.add(b"live", 0, 0)
    now[0] = 2_000
    assert queue.take(True).data == b"live"


def test_a_peek_removes_one_batch_at_a_time_too(impl):
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    batch = queue_mod.EXPIRY_BATCH
    now = [1_000]
    queue = queue_mod.Queue("q", QueueConfig(), None, clock=lambda: now[0])
    for _ in range(batch + 1):
        queue.add(b"old", 0, 1_500)
    now[0] = 2_000
    with pytest.raises(queue_mod.ExpiryBacklog):
        queue.head()
    assert queue.head() is None and queue.items == 0


SCRIPT = r"""
import asyncio, json, socket, struct, sys
import erq.server as server_module
from erq.clock import now_ms
from erq.config import load_config
from erq.queue import EXPIRY_BATCH
from erq.sliced import finish_now

DEEP = 5120  # 20 batches


async def main(data_dir, case):
    config = load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir})
    server = server_module.Server(config)
    await server.start()
    server._sweeper.cancel()  # only the gets remove expired items here
    queues = server.state.queues
    stats = lambda: queues.get("deep").stats(now_ms())

    async def connect_to(port):
        return await asyncio.open_connection("127.0.0.1", port)

    async def connect():
        return await connect_to(server.port)

    async def backlog(first=()):
        for data in first:  # live items ahead of the expired ones
            queues.add("deep", data, 0, 0, None)
        for _ in range(DEEP):
            queues.add("deep", b"x", 0, now_ms() + 20, None)
        queues.add("deep", b"live", 0, 0, None)
        await asyncio.sleep(0.05)

    result = {}
    reader, writer = await connect()
    if case == "others_go_first":
        await backlog()
        other_reader, other_writer = await connect()
        writer.write(b"get deep\r\nget deep/peek\r\n")  # a pipelined request behind it
        other_writer.write(b"version\r\n")
        await other_reader.readline()
        result["items_when_the_other_was_answered"] = stats()["items"]
        result["get"] = (await reader.readuntil(b"END\r\n")).decode()
        result["peek"] = (await reader.readuntil(b"END\r\n")).decode()
    elif case == "close_runs_once":
        await backlog(first=(b"a", b"b"))
        writer.write(b"get deep/open\r\nget deep/open\r\n")
        for _ in range(2):
            await reader.readuntil(b"END\r\n")
        cmd_get = server.state.counters.cmd_get
        writer.write(b"get deep/close/open\r\n")  # confirms a only, then meets the backlog
        result["get"] = (await reader.readuntil(b"END\r\n")).decode()
        result["cmd_get"] = server.state.counters.cmd_get - cmd_get
        result["open"] = stats()["open_transactions"]
    elif case == "half_close":
        await backlog()
        writer.write(b"get deep\r\n")
        writer.write_eof()
        result["reply"] = (await reader.read()).decode()  # all of it, then the end
    elif case == "gone":
        await backlog()
        writer.write(b"get deep\r\n")
        sock = writer.get_extra_info("socket")  # a reset, not a FIN (a FIN is a half-close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        for _ in range(3 * DEEP // EXPIRY_BATCH):
            await asyncio.sleep(0)
        result["items"] = stats()["items"]
        r2, w2 = await connect()
        w2.write(b"get deep\r\n")
        result["next_get"] = (await r2.readuntil(b"END\r\n")).decode()
    elif case == "monitor":
        await backlog()
        writer.write(b"monitor deep 5 1\r\n")
        result["reply"] = (await reader.readuntil(b"END\r\nEND\r\n")).decode()
    elif case == "quiescent":
        await backlog()
        writer.write(b"get deep/t=5000\r\nget deep/t=5000 deep\r\n")
        while stats()["expired_items"] < EXPIRY_BATCH:  # it gave way once, at least
            await asyncio.sleep(0)
        [session] = [proto.session for proto in server.state.connections]
        result["gave_way"] = session.resumes_next_pass
        server.state.set_status("QUIESCENT")  # what `status QUIESCENT` does
        result["get"] = (await reader.readuntil(b"END\r\n")).decode()
        result["next"] = (await reader.readline()).decode()
        server.state.set_status("UP")
        writer.write(b"get deep\r\n")
        result["after"] = (await reader.readuntil(b"END\r\n")).decode()
    elif case == "shutdown":
        await backlog()
        errors = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: errors.append(repr(context)))
        writer.write(b"get deep\r\n")
        while stats()["expired_items"] < EXPIRY_BATCH:  # it gave way once, at least
            await asyncio.sleep(0)
        [session] = [proto.session for proto in server.state.connections]
        result["gave_way"] = session.resumes_next_pass
        server.state.stopping = True  # what shutdown does first, then finish_now for each
        finish_now(session)  # no loop pass in between: the get is done when this returns
        result["waits_after_finish_now"] = session.blocked is not None
        server.request_shutdown("test")
        await server.shutdown()
        for _ in range(3 * DEEP // EXPIRY_BATCH):  # whatever the loop still had to run
            await asyncio.sleep(0)
        result["reply"] = (await reader.read()).decode()
        result["errors"] = errors
        again = server_module.Server(config)
        await again.start()
        again._sweeper.cancel()
        r2, w2 = await connect_to(again.port)
        w2.write(b"get deep\r\n")
        result["after_restart"] = (await r2.readuntil(b"END\r\n")).decode()
        again.request_shutdown("test")
        await again.shutdown()
        print(json.dumps(result))
        return
    result["expired_items"] = stats()["expired_items"]
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_case(impl: str, tmp_path: Path, case: str) -> dict:
    return run_script(impl, SCRIPT, str(tmp_path / "data"), case)


DEEP = 5120  # the script's: 20 batches


def test_the_batch_is_a_few_milliseconds_of_work():
    from erq.queue import EXPIRY_BATCH

    assert EXPIRY_BATCH == 256  # DEEP is 20 of them


def test_a_get_behind_expired_items_lets_other_clients_go_first(impl, tmp_path):
    result = run_case(impl, tmp_path, "others_go_first")
    # Another client's request, sent just after the get, was answered while most of the
    # expired items were still there; the get then answered the live item, in order.
    assert int(result["items_when_the_other_was_answered"]) > DEEP // 2, result
    assert result["get"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert result["peek"] == "END\r\n", result
    assert int(result["expired_items"]) == DEEP, result


def test_a_get_that_gave_way_closes_its_read_once_and_counts_once(impl, tmp_path):
    result = run_case(impl, tmp_path, "close_runs_once")
    # deep/close confirmed the first open read only (a second close would have confirmed b).
    assert result["get"] == "VALUE deep/close/open 0 4\r\nlive\r\nEND\r\n", result
    assert int(result["open"]) == 2, result  # b and live
    assert result["cmd_get"] == 1, result


def test_a_half_closed_client_still_gets_the_answer_of_a_get_that_gave_way(impl, tmp_path):
    result = run_case(impl, tmp_path, "half_close")
    assert result["reply"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result


def test_a_client_that_leaves_during_the_backlog_takes_nothing(impl, tmp_path):
    result = run_case(impl, tmp_path, "gone")
    assert result["next_get"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert int(result["expired_items"]) == DEEP, result


def test_a_get_behind_expired_items_at_shutdown_finishes_while_the_journal_is_open(impl, tmp_path):
    result = run_case(impl, tmp_path, "shutdown")
    # The get went on removing expired items and answered the live one before the journals
    # closed; its removal is journaled, so a restart does not hand the item out again.
    assert result["gave_way"] and not result["waits_after_finish_now"], result
    assert result["reply"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert result["errors"] == [], result
    assert result["after_restart"] == "END\r\n", result


def test_quiescent_ends_a_get_that_gave_way_without_an_item(impl, tmp_path):
    result = run_case(impl, tmp_path, "quiescent")
    # PROTOCOL §3: QUIESCENT answers blocked gets END. A get working through expired items
    # when it came went on and was handed the live item (or, had there been none, waited out
    # its t=); the get behind it is refused, and the live item stays for later.
    assert result["gave_way"], result
    assert result["get"] == "END\r\n", result
    assert result["next"] == "SERVER_ERROR quiescent\r\n", result
    assert result["after"] == "VALUE deep 0 4\r\nlive\r\nEND\r\n", result
    assert int(result["expired_items"]) == DEEP, result


def test_a_monitor_behind_expired_items_streams_the_live_one(impl, tmp_path):
    result = run_case(impl, tmp_path, "monitor")
    assert result["reply"] == "VALUE deep 0 4\r\nlive\r\nEND\r\nEND\r\n", result
    assert int(result["expired_items"]) == DEEP, result
