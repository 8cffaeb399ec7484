"""``max_pending_data``: what sets still arriving may hold over all connections, so that many
clients each sending part of a large item cannot take the server's memory. The parser twins
share a DataBudget; the server refuses a set with no room after skipping its data, as memcached
refuses one it has no memory for, and the connection goes on."""

from __future__ import annotations

import asyncio
import importlib
import time

import pytest

from erq.config import Config
from erq.parser import REQ_CMD, REQ_SET
from erq.queues import QueueCollection
from erq.state import ServerState

from conftest import impl_module
from support import (
    END,
    NOT_SUPPORTED,
    RELOADED,
    STORED,
    TOO_LARGE,
    assert_open,
    config,
    set_req,
    start,
    wait_for_stat,
)

NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
SET, UNSUPPORTED = 1, 4
MODULES = {"py": "erq._parser_py", "c": "erq._fast._parser"}


@pytest.fixture(params=["py", "c"])
def mod(request: pytest.FixtureRequest):
    return importlib.import_module(MODULES[request.param])


# ---- the parser twins ------------------------------------------------------------------------
def test_a_block_arriving_in_pieces_holds_the_room_of_what_came_until_its_last_byte(mod):
    budget = mod.DataBudget(1 << 20)
    parser = mod.Parser(budget=budget)
    assert mod.FIRST_ROOM == 4096
    assert parser.feed(b"set q 0 0 100000\r\n" + b"a" * 10) == []
    assert budget.held == 4096  # what came, at least FIRST_ROOM: not the 100,000 declared
    parser.feed(b"a" * 5_000)
    assert budget.held == 8192  # twice the room
    parser.feed(b"a" * 90_000)
    assert budget.held == 95_010  # what came, when that is more
    assert parser.feed(b"a" * 4_990) == [] and budget.held == 0  # all in: the trailer waits
    assert parser.feed(b"\r\n") == [(SET, b"q", 0, 0, b"a" * 100_000, False)]
    # A block smaller than FIRST_ROOM holds its size.
    assert parser.feed(b"set q 0 0 60\r\n" + b"a" * 10) == [] and budget.held == 60
    assert parser.feed(b"a" * 50 + b"\r\n")[0][4] == b"a" * 60 and budget.held == 0
    # A block that comes whole in one read holds nothing, whatever its size.
    assert parser.feed(b"set q 0 0 500\r\n" + b"b" * 500 + b"\r\n")[0][4] == b"b" * 500
    assert budget.held == 0 and budget.refused == 0
    assert [mod.next_room(r, n, 10_000) for r, n in [(0, 1), (4096, 4097), (0, 9000)]] == [
        4096,
        8192,
        9000,
    ]
    assert mod.next_room(8192, 8193, 10_000) == 10_000  # never past the block's size


def test_a_block_whose_next_bytes_find_no_room_drops_what_came_and_is_refused(mod):
    budget = mod.DataBudget(12_000)
    first, second = mod.Parser(budget=budget), mod.Parser(budget=budget)
    assert first.feed(b"set q 0 0 50000\r\n" + b"a" * 6_000) == [] and budget.held == 6_000
    assert second.feed(b"set q 0 0 8000\r\n" + b"b" * 1_000) == [] and budget.held == 10_096
    # The first's next bytes need 12,000 of room: 6,000 more do not fit beside the second's.
    assert first.feed(b"a" * 2_000) == [] and budget.held == 4_096 and budget.refused == 1
    assert first.buffered == 0  # what it held is dropped; the rest is skipped as it comes
    out = first.feed(b"a" * 42_000 + b"\r\nset q 0 0 2\r\nok\r\n")
    assert out == [(SET, b"q", 0, 0, mod.NO_ROOM, False), (SET, b"q", 0, 0, b"ok", False)]
    # The second, alone now, gets its room past the limit.
    assert second.feed(b"b" * 7_000 + b"\r\n") == [(SET, b"q", 0, 0, b"b" * 8_000, False)]
    assert budget.held == 0 and budget.refused == 1


def test_a_block_with_no_room_is_skipped_and_refused_and_the_next_request_is_read(mod):
    budget = mod.DataBudget(100)
    first, second = mod.Parser(budget=budget), mod.Parser(budget=budget)
    assert first.feed(b"set q 0 0 70\r\n" + b"a") == [] and budget.held == 70
    # 70 + 40 > 100: the second connection's set is read and dropped, then refused.
    assert second.feed(b"set q 1 0 40\r\nb") == [] and budget.held == 70
    assert second.buffered == 0  # skipped bytes are never held
    out = second.feed(b"b" * 39 + b"\r\nset q 0 0 2 noreply\r\nok\r\n")
    assert out == [(SET, b"q", 1, 0, mod.NO_ROOM, False), (SET, b"q", 0, 0, b"ok", True)]
    assert mod.NO_ROOM is False and budget.refused == 1
    # Storage commands a queue does not support are skipped too, with their own reply.
    assert second.feed(b"add q 0 0 40\r\nb") == []
    assert second.feed(b"b" * 39 + b"\r\n") == [(UNSUPPORTED, b"add", False)]
    assert budget.refused == 2
    # Room once the first is in: the same size fits.
    assert first.feed(b"a" * 69 + b"\r\n")[0][4] == b"a" * 70 and budget.held == 0
    assert second.feed(b"set q 0 0 40\r\nb") == [] and budget.held == 40


def test_one_block_is_let_in_when_none_holds_anything_whatever_the_limit(mod):
    budget = mod.DataBudget(0)
    parser, other = mod.Parser(budget=budget), mod.Parser(budget=budget)
    assert parser.feed(b"set q 0 0 1000\r\nx") == [] and budget.held == 1000
    assert other.feed(b"set q 0 0 5\r\nx") == [] and budget.refused == 1
    assert parser.feed(b"x" * 999 + b"\r\n")[0][4] == b"x" * 1000


def test_a_parser_discarded_mid_block_or_closed_by_an_error_gives_its_room_back(mod):
    budget = mod.DataBudget(1 << 20)
    parser = mod.Parser(budget=budget)
    parser.feed(b"set q 0 0 50000\r\n" + b"x" * 5000)
    assert budget.held == 5000
    parser.discard()
    assert budget.held == 0 and parser.closed and parser.feed(b"version\r\n") == []
    parser.discard()  # a second time gives nothing back twice
    assert budget.held == 0
    parser = mod.Parser(budget=budget)
    parser.feed(b"set q 0 0 10\r\n" + b"x" * 5)
    assert budget.held == 10
    out = parser.feed(b"x" * 5 + b"XX")  # a bad trailer closes; the room went with the data
    assert out[-1][0] == 5 and parser.closed and budget.held == 0
    # A parser freed without discard() gives its room back too.
    parser = mod.Parser(budget=budget)
    parser.feed(b"set q 0 0 10\r\nx")
    assert budget.held == 10
    del parser
    assert budget.held == 0


def test_a_parser_freed_mid_block_as_part_of_garbage_cycles_gives_its_room_back(mod):
    """The collector frees a connection's objects in cycles in any order: the C parser's
    budget must still be there when it is freed (it was cleared to None first, and the room
    given back was written through None)."""
    import gc

    class Holder:
        pass

    budget = mod.DataBudget(1 << 20)
    gc.collect()
    for _ in range(3):
        holder = Holder()
        holder.parser = mod.Parser(budget=budget)
        holder.parser.feed(b"set q 0 0 100000\r\n" + b"x" * 10)
        holder.me = holder  # a cycle the parser hangs from, as a protocol and its session do
        assert budget.held == 4096
        del holder
        gc.collect()
        assert budget.held == 0
    with pytest.raises(ValueError):
        mod.Parser(max_line=0, budget=budget)  # a parser whose __init__ failed holds nothing
    assert budget.held == 0


def test_a_parser_without_a_budget_reads_every_block(mod):
    parser = mod.Parser()
    assert parser.feed(b"set q 0 0 3\r\na") == []
    assert parser.feed(b"bc\r\n")[0][4] == b"abc"
    with pytest.raises(TypeError):
        mod.Parser(budget=object())


# ---- over a socket, both builds --------------------------------------------------------------
def wait_for_pending(watcher, at_least: int, timeout: float = 10.0) -> int:
    """Poll ``pending_data_bytes`` until it is at least ``at_least``: a set partly sent holds
    between what came and twice that (its room grows as the server's reads bring it)."""
    deadline = time.monotonic() + timeout
    while (held := int(watcher.stats()["pending_data_bytes"])) < at_least:
        assert time.monotonic() < deadline, f"pending_data_bytes stayed {held}, wanted {at_least}"
        time.sleep(0.005)
    return held


def test_a_set_with_no_room_gets_out_of_memory_after_its_data_and_the_connection_goes_on(
    erq_factory,
):
    server = start(erq_factory, server='max_pending_data = "1MiB"\nmax_item_size = "4MiB"')
    holder, refused, watcher = server.client(), server.client(), server.client()
    holder.send(b"set q 0 0 800000\r\n" + b"h" * 700_000)
    assert 700_000 <= wait_for_pending(watcher, 700_000) <= 800_000
    # Let in (its first bytes fit), then refused as its room grows past what is left.
    refused.send(b"set q 0 0 400000\r\n" + b"r" * 1000)
    refused.send(b"r" * 399000 + b"\r\n")
    assert refused.line() == NO_MEMORY
    assert refused.call(set_req(b"q", b"small")) == STORED  # whole in one read: never held
    refused.send(b"set q 0 0 400000 noreply\r\n" + b"r" * 400000 + b"\r\n")  # silently
    wait_for_stat(watcher, "pending_data_refusals", 2)
    assert_open(refused)
    holder.send(b"h" * 100_000 + b"\r\n")
    assert holder.line() == STORED
    stats = wait_for_stat(watcher, "pending_data_bytes", 0)
    assert stats["pending_data_refusals"] == "2" and stats["cmd_set"] == "4"
    assert stats["curr_items"] == "2"  # the refused sets stored nothing
    assert watcher.get("q") == b"VALUE q 0 5\r\nsmall\r\nEND\r\n"  # in the order stored
    assert watcher.get("q") == b"VALUE q 0 800000\r\n" + b"h" * 800000 + b"\r\nEND\r\n"
    # Past max_item_size the reply is still too large, whatever room there is.
    refused.send(b"set q 0 0 5000000\r\n" + b"x" * 5000000 + b"\r\n")
    assert refused.line() == TOO_LARGE
    assert refused.call(b"add q 0 0 1\r\nx\r\n") == NOT_SUPPORTED


def test_sets_that_say_much_and_send_little_hold_little(erq_factory):
    """Room is taken as data comes, not as a request line says: clients that each declare a
    64 MiB set and send a few bytes hold a few KiB apiece, and lock no other set out."""
    server = start(erq_factory, server='max_pending_data = "1MiB"')
    stalled = [server.client() for _ in range(20)]
    for client in stalled:
        client.send(b"set q 0 0 67108864\r\n" + b"s" * 100)
    watcher = server.client()
    assert wait_for_pending(watcher, 20 * 4096) == 20 * 4096  # FIRST_ROOM each
    big = server.client()
    assert big.call(b"set q 0 0 900000\r\n" + b"b" * 900000 + b"\r\n") == STORED
    assert watcher.stats()["pending_data_refusals"] == "0"
    for client in stalled:
        client.close()
    wait_for_stat(watcher, "pending_data_bytes", 0)


def test_a_client_gone_mid_set_gives_its_room_back_and_one_set_always_gets_in(erq_factory):
    server = start(erq_factory, server='max_pending_data = "64KiB"')
    watcher = server.client()
    gone = server.client()
    gone.send(b"set q 0 0 500000\r\n" + b"g" * 200_000)  # alone: its room grows past the limit
    wait_for_pending(watcher, 200_000)
    gone.close()
    wait_for_stat(watcher, "pending_data_bytes", 0)
    big = server.client()
    assert big.call(b"set q 0 0 500000\r\n" + b"b" * 500000 + b"\r\n") == STORED
    assert watcher.stats()["pending_data_refusals"] == "0"


def test_a_reload_sets_the_limit_and_the_sets_already_let_in_keep_their_room(erq_factory):
    server = erq_factory(config=config(server='max_pending_data = "1MiB"'))
    holder, other, watcher = server.client(), server.client(), server.client()
    holder.send(b"set q 0 0 600000\r\n" + b"h" * 550_000)
    wait_for_pending(watcher, 550_000)
    server.write_config(config(server='max_pending_data = "512KiB"'))
    assert watcher.call(b"reload\r\n") == RELOADED
    other.send(b"set q 0 0 100\r\n" + b"o")  # 550,000 + 100 > 512 KiB: no room now
    wait_for_stat(watcher, "pending_data_refusals", 1)
    other.send(b"o" * 99 + b"\r\n")
    assert other.line() == NO_MEMORY
    holder.send(b"h" * 50_000 + b"\r\n")  # alone: it keeps its room and gets more
    assert holder.line() == STORED
    # And a reload that raises it gives room at once.
    server.write_config(config(server='max_pending_data = "2MiB"'))
    assert watcher.call(b"reload\r\n") == RELOADED
    holder.send(b"set q 0 0 600000\r\n" + b"h" * 550_000)
    wait_for_pending(watcher, 550_000)
    assert other.call(b"set q 0 0 900000\r\n" + b"o" * 900000 + b"\r\n") == STORED


# ---- data held back behind a blocked get -----------------------------------------------------
def test_a_pipeline_held_back_keeps_room_for_its_sets_data_until_they_run(impl):
    """Session.hold_back, on each build. While the client holds the pipeline (here a get
    waiting for an item), a held set keeps room: any amount while this connection is the only
    one holding room, else only what fits; one that finds none lets its data go and is
    refused in its turn; a set refused as it came holds none. A pause of the server's own
    (give_way) counts its sets and refuses none. Running or dropping the pipeline gives the
    room back."""
    session_mod = impl_module(impl, "_session", "_session_py")
    parser = impl_module(impl, "_parser", "_parser_py")
    loop = asyncio.new_event_loop()
    try:
        state = ServerState(Config(), QueueCollection(Config(), None), loop)
        budget = state.data_budget = parser.DataBudget(1000)
        ran: list[tuple] = []
        session = session_mod.Session(
            state, lambda s, r: ran.append(r), lambda d: None, lambda: None
        )

        def set_of(data):
            return (REQ_SET, b"q", 0, 0, data, False)

        blocked_get = object()
        session.blocked = blocked_get  # a get waiting for an item holds the pipeline
        first, second = set_of(b"a" * 5000), set_of(b"b" * 10)
        session.hold_back([first, set_of(False), set_of(None), second])
        assert budget.held == 5010 and session.pending_data == 5010  # this connection alone
        budget.hold(100)  # another connection's set, held back too
        session.hold_back([set_of(b"c" * 10), (REQ_CMD, b"version", [])])
        assert budget.held == 5110 and budget.refused == 1  # no room for it now
        held = [r[4] for r in list(session.pending)[:5]]
        assert held == [b"a" * 5000, False, None, b"b" * 10, False]
        budget.give(100)
        session.blocked = None
        session.run()
        assert ran[0] is first and [r[4] for r in ran[1:5]] == [False, None, b"b" * 10, False]
        assert budget.held == 0 and session.pending_data == 0

        budget.take(900)  # another connection's
        session.hold_back([set_of(b"d" * 600), set_of(b"e" * 300)])  # the server's own pause
        assert budget.held == 1800 and budget.refused == 1  # counted, not refused
        session.close_after(None)
        assert budget.held == 900 and session.pending_data == 0 and not session.pending
    finally:
        loop.close()


def test_a_set_held_back_behind_a_blocked_get_keeps_its_room_until_it_runs(erq_factory):
    """Data a client sent behind a blocked get is memory it makes the server hold, as much as
    data still arriving: such sets keep their room until they run, and one that finds none is
    refused when its turn comes (each pipeline would otherwise hold max_item_size more)."""
    server = start(erq_factory, server='max_pending_data = "64KiB"')
    watcher = server.client()
    first, second = server.client(), server.client()
    first.send(b"get wake1/t=20000\r\nset q 0 0 40000\r\n" + b"a" * 40000 + b"\r\nversion\r\n")
    wait_for_stat(watcher, "pending_data_bytes", "40000")
    second.send(b"get wake2/t=20000\r\nset q 0 0 40000\r\n" + b"b" * 40000 + b"\r\nversion\r\n")
    wait_for_stat(watcher, "pending_data_refusals", "1")
    assert watcher.stats()["pending_data_bytes"] == "40000"  # the refused data is let go
    assert watcher.set("wake2", b"2") == STORED
    assert second.until() == b"VALUE wake2/t=20000 0 1\r\n2\r\nEND\r\n"
    assert second.line() == NO_MEMORY
    assert second.line().startswith(b"VERSION ")
    assert watcher.set("wake1", b"1") == STORED
    assert first.until() == b"VALUE wake1/t=20000 0 1\r\n1\r\nEND\r\n"
    assert first.line() == STORED
    assert first.line().startswith(b"VERSION ")
    stats = wait_for_stat(watcher, "pending_data_bytes", "0")
    assert stats["queue_q_items"] == "1"
    assert watcher.get("q") == b"VALUE q 0 40000\r\n" + b"a" * 40000 + b"\r\nEND\r\n"


def test_one_set_held_back_alone_is_let_in_whatever_the_limit(erq_factory):
    """A set larger than max_pending_data behind a get that waits: what came of it in the
    get's read holds room, the rest is read once the get ends, and it is let in, alone."""
    server = start(erq_factory, server='max_pending_data = "64KiB"')
    watcher, client = server.client(), server.client()
    client.send(b"get wake/t=20000\r\nset q 0 0 200000\r\n" + b"a" * 200000 + b"\r\n")
    wait_for_stat(watcher, "queue_wake_waiters", "1")
    assert watcher.set("wake", b"1") == STORED
    assert client.until() == b"VALUE wake/t=20000 0 1\r\n1\r\nEND\r\n"
    assert client.line() == STORED
    stats = wait_for_stat(watcher, "pending_data_bytes", "0")
    assert stats["pending_data_refusals"] == "0"


def test_a_client_gone_with_sets_held_back_gives_their_room_back(erq_factory):
    """The set read with the get is held back with its room; the one sent after waits
    unread; the client leaves and the room comes back, nothing stored."""
    server = start(erq_factory, server='max_pending_data = "1MiB"')
    watcher, client = server.client(), server.client()
    client.send(b"get wake/t=20000\r\nset q 0 0 10000\r\n" + b"a" * 10000 + b"\r\n")
    wait_for_stat(watcher, "pending_data_bytes", "10000")
    client.send(b"set q 0 0 100000\r\n" + b"b" * 100000 + b"\r\n")
    time.sleep(0.05)
    assert watcher.stats()["pending_data_bytes"] == "10000"  # not read while the get waits
    client.close()
    stats = wait_for_stat(watcher, "pending_data_bytes", "0")
    assert stats["curr_items"] == "0"
    assert watcher.call(b"set q 0 0 900000\r\n" + b"c" * 900000 + b"\r\n") == STORED


def test_a_set_refused_as_it_came_waits_its_turn_behind_a_blocked_get(erq_factory):
    """A set refused for want of room while its data came (NO_ROOM) behind a blocked get:
    answered in its turn, and the connection goes on (it used to end with a TypeError)."""
    server = start(erq_factory, server='max_pending_data = "1MiB"')
    watcher, holder, client = server.client(), server.client(), server.client()
    holder.send(b"set held 0 0 1048000\r\n" + b"h" * 1_047_999)
    wait_for_pending(watcher, 1_047_999)  # at most 577 bytes of room left
    client.send(b"get wake/t=20000\r\nset q 0 0 400000\r\n" + b"r" * 1000)
    wait_for_stat(watcher, "pending_data_refusals", "1")  # refused as it came, held back
    client.send(b"r" * 399000 + b"\r\nversion\r\n")
    assert watcher.set("wake", b"1") == STORED
    assert client.until() == b"VALUE wake/t=20000 0 1\r\n1\r\nEND\r\n"
    assert client.line() == NO_MEMORY
    assert client.line().startswith(b"VERSION ")
    holder.send(b"h\r\n")
    assert holder.line() == STORED
    wait_for_stat(watcher, "pending_data_bytes", "0")


def test_sets_that_wait_for_the_servers_own_pause_are_not_refused(erq_factory):
    """A pipeline that gave way after 16 queues made: its sets wait a pass of the loop, which
    is no reason to refuse them (the second was refused: the first, held, took the room)."""
    server = start(erq_factory, server='max_pending_data = "64KiB"')
    client, watcher = server.client(), server.client()
    sets = (b"set q 0 0 40000\r\n" + b"s" * 40000 + b"\r\n") * 2
    client.send(b"".join(b"get new%02d\r\n" % i for i in range(16)) + sets)
    assert client.until(STORED) == END * 16 + STORED
    assert client.line() == STORED
    stats = wait_for_stat(watcher, "pending_data_bytes", "0")
    assert stats["pending_data_refusals"] == "0" and stats["queue_q_items"] == "2"
