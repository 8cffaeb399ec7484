"""With ``fsync = "always"`` every reply that reports a removal waits for its sync, as STORED
waits for the add's: a plain get's value, a close or confirm, a flush. Otherwise a power cut
after the reply brings the item back, to be handed out again. Opening a read or aborting one
need not wait: after a power cut an open read is back at the head either way. Both builds.

The server runs in its own process (the build is chosen at import) with its fsync worker's
jobs held until the script lets them go, so what waits for a sync can be seen.
"""

from __future__ import annotations

from support import run_script

SCRIPT = r"""
import asyncio, json, sys
import erq.journal.fsync_worker as fsync_worker
import erq.server as server_module
from erq.config import load_config

Real = fsync_worker.FsyncWorker
held, holding = [], [False]


class HeldWorker:  # the real worker, whose jobs wait while ``holding``
    def __init__(self):
        self.real = Real()

    def fileno(self):
        return self.real.fileno()

    def submit(self, fds, dirs):
        if holding[0]:
            held.append((fds, dirs))
        else:
            self.real.submit(fds, dirs)

    def collect(self, wait=False):
        return self.real.collect(wait)

    def close(self):
        self.real.close()


fsync_worker.FsyncWorker = HeldWorker


def removals(data_dir, name):
    from pathlib import Path
    from erq.journal import codec
    from erq.journal.format import OP_REMOVE

    ids = []
    for path in sorted((Path(data_dir) / name).glob("*.seg")):
        ids += [rec[2] for rec in codec.iter_records(path.read_bytes()) if rec[1] == OP_REMOVE]
    return ids


async def release_held(keep_holding=False):
    holding[0] = keep_holding
    for job in held:
        server._commit._worker.real.submit(*job)
    held.clear()


async def finish(writer, result):
    writer.close()
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps(result))


async def read_lines(reader, count):
    replies = b""
    while replies.count(b"\n") < count:  # (a reply may be split between two reads)
        replies += await reader.read(1 << 16)
    return replies


async def main(data_dir, config_path, case):
    global server
    config = load_config(config_path, cli={"port": 0, "admin_port": 0, "data_dir": data_dir})
    server = server_module.Server(config)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    if case == "expiry":
        await expiry_move(data_dir, reader, writer)
        return
    if case == "pipelined":
        await one_sync_done(reader, writer)
        return
    if case == "stalled":
        await sync_stalled(reader, writer)
        return
    if case == "stalled_lines":
        await lines_behind_a_stalled_sync(reader, writer)
        return
    if case == "stop_while_stalled":
        await stop_while_a_sync_stalls(reader, writer)
        return

    async def call(request, end=b"END\r\n"):
        writer.write(request)
        return (await reader.readuntil(end)).decode()

    async def held_reply(request, end=b"END\r\n"):
        # Sent while syncs are held: is the reply there before they are let go?
        holding[0] = True
        writer.write(request)
        try:
            early = await asyncio.wait_for(reader.readuntil(end), 0.3)
        except asyncio.TimeoutError:
            early = None
        await release_held()
        reply = early if early is not None else await reader.readuntil(end)
        return {"waited": early is None, "reply": reply.decode()}

    for data in (b"a", b"b", b"c", b"d", b"e"):
        await call(b"set q 0 0 1\r\n%s\r\n" % data, b"\r\n")
    result = {
        "get": await held_reply(b"get q\r\n"),
        "open": await held_reply(b"get q/open\r\n"),
        "peek": await held_reply(b"get q/peek\r\n"),
        "close": await held_reply(b"get q/close\r\n"),
    }
    await call(b"get q/open\r\n")
    result["abort"] = await held_reply(b"get q/abort\r\n")
    await call(b"get q/open\r\n")
    result["confirm"] = await held_reply(b"confirm q 1\r\n")
    result["flush"] = await held_reply(b"flush q\r\n")
    await call(b"set q 0 0 1\r\nf\r\n", b"\r\n")
    result["flush_all"] = await held_reply(b"flush_all\r\n", b"OK\r\n")
    result["items"] = server.state.queues.get("q").items
    await finish(writer, result)

async def expiry_move(data_dir, reader, writer):
    writer.write(b"set src 0 -1 1\r\nx\r\n")  # expired as it arrives
    await reader.readline()
    holding[0] = True
    writer.write(b"get src\r\n")  # moves it to dst: dst's add waits for its sync
    result = {"get": (await reader.readuntil(b"END\r\n")).decode()}
    result["removed_before_the_copy_synced"] = removals(data_dir, "src")
    await release_held()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if removals(data_dir, "src"):
            break
    result["removed_after"] = removals(data_dir, "src")
    writer.write(b"get dst\r\n")
    result["dst"] = (await reader.readuntil(b"END\r\n")).decode()
    await finish(writer, result)


async def one_sync_done(reader, writer):
    # Two sets in two syncs: the first one's reply goes out once its sync is done, while
    # the second's waits for its own; a reply before the first, at once.
    async def replies():
        got = b""
        try:
            while True:
                got += await asyncio.wait_for(reader.read(100), 0.3)
        except asyncio.TimeoutError:
            return got.decode()

    holding[0] = True
    writer.write(b"version\r\nset q 0 0 1\r\na\r\n")
    result = {"before_any_sync": await replies()}
    writer.write(b"set q 0 0 1\r\nb\r\nget q/peek\r\n")
    await asyncio.sleep(0.1)
    result["syncs_held"] = len(held)
    await release_held(keep_holding=True)  # the first sync: the second is held in its turn
    result["first_synced"] = await replies()
    result["syncs_held_after"] = len(held)
    await release_held()
    result["second_synced"] = await replies()
    await finish(writer, result)


async def sync_stalled(reader, writer):
    # A pipeline of sets while the disk does not finish a sync: how many run?
    count = 200_000
    holding[0] = True
    writer.write(b"set q 0 0 1\r\nx\r\n" * count)
    queue, ran = None, -1
    while True:  # until the sets stop running
        await asyncio.sleep(0.3)
        queue = queue or server.state.queues.get("q")
        if queue is not None and queue.items == ran:
            break
        ran = queue.items if queue is not None else -1
    result = {"ran_while_stalled": ran}
    try:
        early = await asyncio.wait_for(reader.read(100), 0.1)
    except asyncio.TimeoutError:
        early = b""
    result["replies_while_stalled"] = early.decode()
    await release_held()
    result["stored"] = (await read_lines(reader, count)).count(b"STORED\r\n")
    result["items"] = queue.items
    await finish(writer, result)


async def lines_behind_a_stalled_sync(reader, writer):
    # One set whose sync does not finish, then short replies that wait for nothing but it.
    count = 200_000
    holding[0] = True
    writer.write(b"set q 0 0 1\r\nx\r\n" + b"version\r\n" * count)
    (session,) = [c.session for c in server.state.connections]
    unsent = -1
    while len(session.out) != unsent:  # until the requests stop running
        unsent = len(session.out)
        await asyncio.sleep(0.3)
    result = {"unsent_while_stalled": unsent}
    await release_held()
    result["versions"] = (await read_lines(reader, count + 1)).count(b"VERSION ")
    await finish(writer, result)


async def stop_while_a_sync_stalls(reader, writer):
    # A stop while the pipeline waits for a sync (its held replies fill OUT_BUDGET): the sets
    # it read are in flight, and run once the sync is done. (A few more than the budget: all
    # of them are read, none left in the socket.)
    count = 133_000
    holding[0] = True
    writer.write(b"set q 0 0 1\r\nx\r\n" * count)
    (session,) = [c.session for c in server.state.connections]
    while not session.pending:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    queue = server.state.queues.get("q")
    result = {"ran_before_the_stop": queue.items}
    server.request_shutdown("test")
    stopping = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0.3)
    await release_held()
    replies = b""
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        replies += chunk
    await stopping
    result["stored"] = replies.count(b"STORED\r\n")
    result["items"] = queue.items
    print(json.dumps(result))


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def test_replies_that_report_a_removal_wait_for_its_sync(impl, tmp_path):
    config = tmp_path / "erq.toml"
    config.write_text('[queues.q]\nfsync = "always"\n')
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "replies")
    assert result["get"] == {"waited": True, "reply": "VALUE q 0 1\r\na\r\nEND\r\n"}, result
    assert result["close"] == {"waited": True, "reply": "END\r\n"}, result  # confirms b
    assert result["confirm"] == {"waited": True, "reply": "END\r\n"}, result
    assert result["flush"] == {"waited": True, "reply": "END\r\n"}, result
    assert result["flush_all"] == {"waited": True, "reply": "OK\r\n"}, result
    # An open, an abort and a peek report nothing a power cut could undo.
    assert result["open"] == {"waited": False, "reply": "VALUE q/open 0 1\r\nb\r\nEND\r\n"}, result
    assert result["peek"] == {"waited": False, "reply": "VALUE q/peek 0 1\r\nc\r\nEND\r\n"}, result
    assert result["abort"] == {"waited": False, "reply": "END\r\n"}, result
    assert result["items"] == 0, result


def test_an_expired_item_leaves_its_queue_in_the_journal_once_its_moved_copy_is_synced(
    impl, tmp_path
):
    """expire_to_queue with fsync = "always": the removal from the queue it expired in is
    journaled after the copy's add is synced, so a power cut finds the item in one of the
    two queues, or both, never in neither (the removal first lost it)."""
    config = tmp_path / "erq.toml"
    config.write_text(
        '[queues.src]\nfsync = "always"\nexpire_to_queue = "dst"\n[queues.dst]\nfsync = "always"\n'
    )
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "expiry")
    assert result["get"] == "END\r\n", result
    assert result["removed_before_the_copy_synced"] == [], result
    assert result["removed_after"] == [1], result
    assert result["dst"] == "VALUE dst 0 1\r\nx\r\nEND\r\n", result


def test_a_reply_goes_out_once_its_sync_is_done_while_later_ones_wait(impl, tmp_path):
    """A client that pipelines sets faster than the disk syncs always has one waiting for
    the next sync: each reply goes out with its own sync, not once the client stops."""
    config = tmp_path / "erq.toml"
    config.write_text('[queues.q]\nfsync = "always"\n')
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "pipelined")
    assert result["before_any_sync"].startswith("VERSION "), result  # waits for no sync
    assert result["syncs_held"] == 1, result  # the second set waits for the first's sync
    assert result["first_synced"] == "STORED\r\n", result
    assert result["syncs_held_after"] == 1, result
    assert result["second_synced"] == "STORED\r\nVALUE q/peek 0 1\r\na\r\nEND\r\n", result


def test_replies_held_for_a_stalled_sync_stop_the_pipeline_at_the_output_budget(impl, tmp_path):
    """Replies waiting for a sync count against OUT_BUDGET: a client pipelining sets while
    the disk does not finish a sync holds ~1 MiB of STORED lines, then its sets wait, rather
    than every set it sends running with its reply kept."""
    config = tmp_path / "erq.toml"
    config.write_text('[queues.q]\nfsync = "always"\n')
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "stalled")
    budget = (1 << 20) // len(b"STORED\r\n")
    assert budget <= result["ran_while_stalled"] < budget + 8192, result
    assert result["replies_while_stalled"] == "", result
    assert result["stored"] == result["items"] == 200_000, result


def test_short_replies_behind_a_stalled_sync_stop_the_pipeline_at_their_number(impl, tmp_path):
    """Short lines (a version, a miss's END) are not counted in bytes: behind a reply that
    waits for a sync that does not finish, their number stops the pipeline (MAX_UNSENT),
    rather than every request the client streams running with its reply kept."""
    from erq._session_py import MAX_UNSENT, REQUESTS_PER_PASS

    config = tmp_path / "erq.toml"
    config.write_text('[queues.q]\nfsync = "always"\n')
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "stalled_lines")
    assert MAX_UNSENT < result["unsent_while_stalled"] <= MAX_UNSENT + 2 * REQUESTS_PER_PASS
    assert result["versions"] == 200_000, result


def test_a_stop_while_a_sync_stalls_runs_the_sets_read_behind_it(impl, tmp_path):
    """PROTOCOL §6: a graceful stop finishes the requests in flight. Sets held back while
    their pipeline waits for a sync (OUT_BUDGET of replies waiting, since cda0869) run once
    it is done, within the stop's wait for the syncs, before the connection closes."""
    config = tmp_path / "erq.toml"
    config.write_text('[queues.q]\nfsync = "always"\n')
    result = run_script(impl, SCRIPT, str(tmp_path / "data"), str(config), "stop_while_stalled")
    assert result["ran_before_the_stop"] < 133_000, result  # the pipeline waited
    assert result["stored"] == result["items"] == 133_000, result


FANOUT_SCRIPT = r"""
import asyncio, json, sys
import erq.server as server_module
from erq.config import load_config
from erq.journal import JournalError, QueueJournal

real_sync_work = QueueJournal.sync_work


def sync_work(journal, work):  # the child's disk fails its syncs
    if journal.directory.name == "fan+bad":
        raise JournalError("fsync of fan+bad failed: injected")
    return real_sync_work(journal, work)


QueueJournal.sync_work = sync_work


async def main(data_dir, config_path):
    config = load_config(config_path, cli={"port": 0, "admin_port": 0, "data_dir": data_dir})
    server = server_module.Server(config)
    await server.start()
    server._commit._use_worker = False  # each batch through sync_work, in the executor
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def call(request, end=b"\r\n"):
        writer.write(request)
        return (await reader.readuntil(end)).decode()

    result = {
        "children": [await call(b"get fan+%s\r\n" % kid, b"END\r\n") for kid in (b"bad", b"ok")],
        "set": await call(b"set fan 0 0 5\r\nhello\r\n"),
        "direct": await call(b"set fan+bad 0 0 5\r\nhello\r\n"),
        "items": {n: server.state.queues.get(n).items for n in ("fan", "fan+bad", "fan+ok")},
    }
    writer.close()
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_fanout_childs_failed_sync_does_not_fail_its_parents_set(impl, tmp_path):
    """PROTOCOL §7: a set's reply is its parent's. Under fsync = "always" the reply waits for
    the copies' syncs too, but one that fails is the child's (kept for its next sync), not a
    SERVER_ERROR for a set whose item is durable in its queue (a retry duplicated it)."""
    config = tmp_path / "erq.toml"
    config.write_text('[queues.default]\nfsync = "always"\n')
    result = run_script(impl, FANOUT_SCRIPT, str(tmp_path / "data"), str(config))
    assert result["children"] == ["END\r\n", "END\r\n"], result
    assert result["set"] == "STORED\r\n", result
    assert result["direct"] == "SERVER_ERROR journal sync failed\r\n", result  # its own
    assert result["items"] == {"fan": 1, "fan+bad": 2, "fan+ok": 1}, result
