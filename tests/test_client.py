"""``erq.client``: the multi-server client (PROTOCOL.md §9) against three real local servers.

Each test starts three erq processes of the parametrised build and drives them through
``Client`` (blocking sockets) or ``AsyncClient`` (asyncio streams), checking every server's own view
over raw connections: which server got a write, which one holds an open read, what a killed and
restarted one gives back.
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest
from pymemcache.client.rendezvous import RendezvousHash

from erq.client import AsyncClient, Client, ErqError, Item, check_queue_name

from conftest import ErqProcess, RawClient
from support import END, STORED, poll, start

QUEUE = "jobs"


@pytest.fixture
def servers(erq_factory) -> list[ErqProcess]:
    return [erq_factory(name=f"s{i}") for i in range(3)]


def addresses(procs: list[ErqProcess]) -> list[tuple[str, int]]:
    return [("127.0.0.1", p.port) for p in procs]


def stat(raw: RawClient, queue: str, field: str) -> int:
    return int(raw.stats().get(f"queue_{queue}_{field}", "0"))


def drain_raw(raw: RawClient, queue: str) -> list[bytes]:
    """Everything left in ``queue`` on one server, in order, over a raw connection."""
    out = []
    while True:
        reply = raw.get(queue)
        if reply == END:
            return out
        head, data, _ = reply.split(b"\r\n", 2)
        out.append(data)


def drain(client: Client, queue: str = QUEUE) -> list[bytes]:
    out = []
    while (data := client.get(queue)) is not None:
        out.append(data)
        assert len(out) < 10_000, "a drain that never ends"
    return out


def fill(raws: list[RawClient], queue: str = QUEUE, per_server: int = 4) -> list[list[bytes]]:
    """Distinct items on each server, set directly; returns them per server, in order."""
    placed = []
    for i, raw in enumerate(raws):
        items = [b"s%d-%d" % (i, k) for k in range(per_server)]
        for data in items:
            assert raw.set(queue, data) == STORED
        placed.append(items)
    return placed


@pytest.fixture
def raws(servers):
    clients = [p.client() for p in servers]
    yield clients
    for c in clients:
        c.close()


# ---- writes -----------------------------------------------------------------------------------
def test_round_robin_writes_go_to_each_server_in_turn(servers, raws):
    with Client(addresses(servers), write_policy="round_robin") as client:
        for k in range(9):
            assert client.put(QUEUE, b"%d" % k, flags=k) is True
    for i, raw in enumerate(raws):
        assert drain_raw(raw, QUEUE) == [b"%d" % k for k in range(i, 9, 3)]
    assert raws[2].get(QUEUE) == END


def test_random_writes_reach_every_server_and_repeat_with_a_seed(servers, raws):
    counts = []
    for _ in range(2):
        with Client(addresses(servers), write_policy="random", seed=7) as client:
            for k in range(60):
                assert client.put(QUEUE, b"%d" % k)
        counts.append([len(drain_raw(raw, QUEUE)) for raw in raws])
    assert counts[0] == counts[1]
    assert sum(counts[0]) == 60
    assert all(n > 0 for n in counts[0]), counts


def test_put_keeps_flags_and_rejects_a_bad_queue_name(servers, raws):
    with Client(addresses(servers[:1])) as client:
        assert client.put(QUEUE, b"x\r\nEND\r\n", flags=42)
        item = client.get_reliable(QUEUE)
        assert (item.data, item.flags) == (b"x\r\nEND\r\n", 42)
        assert item.confirm()
        for bad in ("", "a/b", "a b", "a.b", "+a", "a+b+c", "x" * 251, "jöbs", "j?bs\x7f"):
            with pytest.raises(ValueError):
                client.put(bad, b"x")
        # Any bytes-like value; not an int (bytes(5) is five NULs) nor a str (no encoding).
        assert client.put(QUEUE, bytearray(b"ba")) and client.put(QUEUE, memoryview(b"mv"))
        for wrong in (5, "text", [1, 2]):
            with pytest.raises(TypeError, match=f"bytes-like .*, not {type(wrong).__name__}$"):
                client.put(QUEUE, wrong)
        assert drain(client) == [b"ba", b"mv"]
    check_queue_name("parent+child")


def test_an_item_one_server_refuses_goes_to_another_without_skipping_that_server(erq_factory):
    small = start(erq_factory, server="max_item_size = 16", name="small")
    others = [erq_factory(name=f"s{i}") for i in (1, 2)]
    procs = [small, *others]
    with Client(addresses(procs), write_policy="round_robin") as client:
        assert client.put(QUEUE, b"x" * 32)  # SERVER_ERROR object too large -> next server
        for k in range(3):
            assert client.put(QUEUE, b"%d" % k)
    counts = []
    for proc in procs:
        raw = proc.client()
        counts.append(stat(raw, QUEUE, "items"))
        raw.close()
    assert counts == [1, 2, 1]  # the small server still took its turn


# ---- reads ------------------------------------------------------------------------------------
def test_sticky_reads_drain_each_server_in_turn_exactly_once(servers, raws):
    placed = fill(raws)
    with Client(addresses(servers)) as client:
        got = drain(client)
    # sticky: all of one server (FIFO) before the next
    assert got == placed[0] + placed[1] + placed[2]
    assert all(stat(raw, QUEUE, "items") == 0 for raw in raws)


def test_sticky_read_moves_to_a_server_that_got_items_later(servers, raws):
    with Client(addresses(servers)) as client:
        assert client.get(QUEUE) is None
        assert raws[1].set(QUEUE, b"late") == STORED
        assert client.get(QUEUE) == b"late"
        assert raws[1].set(QUEUE, b"again") == STORED
        assert raws[0].set(QUEUE, b"first server") == STORED
        assert client.get(QUEUE) == b"again"  # stuck to server 1 while it has items
        assert client.get(QUEUE) == b"first server"
        assert client.get(QUEUE) is None


def test_blocking_get_returns_an_item_set_while_it_waits(servers, raws):
    results: list[object] = []
    with Client(addresses(servers)) as client:
        reader = threading.Thread(
            target=lambda: results.append(client.get(QUEUE, timeout_ms=60_000)), daemon=True
        )
        reader.start()
        waiting = poll(
            lambda: [raw for raw in raws if stat(raw, QUEUE, "waiters") == 1],
            "a blocked get on one server",
        )
        assert len(waiting) == 1
        assert waiting[0].set(QUEUE, b"arrived") == STORED
        reader.join(30)
        assert not reader.is_alive()
    assert results == [b"arrived"]


def test_blocking_get_returns_none_when_its_wait_ends(servers, raws):
    with Client(addresses(servers)) as client:
        assert client.get(QUEUE, timeout_ms=20) is None
        assert client.get_reliable(QUEUE, timeout_ms=20) is None
    assert sum(stat(raw, QUEUE, "waiters") for raw in raws) == 0


# ---- reliable reads ---------------------------------------------------------------------------
def hashes_apart(procs: list[ErqProcess]) -> str:
    """A queue name that a hash-based client (pymemcache's HashClient) would open on one server
    and close on another."""
    ring = RendezvousHash([f"127.0.0.1:{p.port}" for p in procs])
    for k in range(1000):
        name = f"work{k}"
        if ring.get_node(f"{name}/open") != ring.get_node(f"{name}/close"):
            return name
    raise AssertionError("no name hashes apart")


@pytest.mark.parametrize("holder", [0, 1, 2])
def test_confirm_and_abort_go_to_the_server_that_handed_the_item_out(servers, raws, holder):
    queue = hashes_apart(servers)
    raw = raws[holder]
    assert raw.set(queue, b"payload") == STORED
    with Client(addresses(servers)) as client:
        item = client.get_reliable(queue)
        assert item is not None and item.data == b"payload"
        assert item.server == ("127.0.0.1", servers[holder].port)
        assert (stat(raw, queue, "open_transactions"), stat(raw, queue, "items")) == (1, 0)
        assert client.get(queue) is None  # a plain get of the same queue does not abort it
        assert item.abort() is True
        assert (stat(raw, queue, "open_transactions"), stat(raw, queue, "items")) == (0, 1)
        again = client.get_reliable(queue)
        assert again.data == b"payload" and again.server == item.server
        assert client.confirm(again) is True
        assert again.state == "confirmed"
        assert (stat(raw, queue, "open_transactions"), stat(raw, queue, "items")) == (0, 0)
        assert stat(raw, queue, "canceled_transactions") == 1
        with pytest.raises(ValueError):
            again.confirm()


def test_open_items_are_confirmed_oldest_first_per_server(servers, raws):
    fill(raws[:1], per_server=2)
    with Client(addresses(servers)) as client:
        first = client.get_reliable(QUEUE)
        second = client.get_reliable(QUEUE)
        with pytest.raises(ValueError, match="oldest"):
            second.confirm()
        assert first.data == b"s0-0" and first.confirm()
        assert second.data == b"s0-1" and second.abort()
    assert drain_raw(raws[0], QUEUE) == [b"s0-1"]


def test_get_reliable_can_confirm_the_previous_item_in_the_same_request(servers, raws):
    placed = fill(raws, per_server=2)
    with Client(addresses(servers)) as client:
        got = []
        item = client.get_reliable(QUEUE)
        while item is not None:
            got.append(item.data)
            previous = item
            item = client.get_reliable(QUEUE, confirm=previous)
            assert previous.state == "confirmed"
    assert got == placed[0] + placed[1] + placed[2]
    for raw in raws:
        assert (stat(raw, QUEUE, "open_transactions"), stat(raw, QUEUE, "items")) == (0, 0)
        assert stat(raw, QUEUE, "transactions") == 2


def test_too_many_open_reads_raise_and_lose_the_open_items(erq_factory):
    proc = start(erq_factory, server="max_open_reads = 1")
    raw = proc.client()
    fill([raw], per_server=2)
    with Client([f"127.0.0.1:{proc.port}"]) as client:
        held = client.get_reliable(QUEUE)
        with pytest.raises(ErqError):
            client.get_reliable(QUEUE)  # ERROR and close: the server aborts the open read
        assert held.state == "lost"
        assert held.confirm() is False
        assert drain(client) == [b"s0-0", b"s0-1"]

    fill([raw], per_server=2)

    async def main() -> None:
        async with AsyncClient([f"127.0.0.1:{proc.port}"]) as client:
            held = await client.get_reliable(QUEUE)
            with pytest.raises(ErqError):
                await client.get_reliable(QUEUE)
            assert held.state == "lost" and await held.confirm() is False
            assert await client.get(QUEUE) == b"s0-0"

    asyncio.run(main())
    raw.close()


# ---- draining and failing servers -------------------------------------------------------------
def test_readonly_server_gets_no_writes_but_is_still_read(servers, raws):
    assert raws[1].set(QUEUE, b"before") == STORED
    assert raws[1].call(b"status READONLY\r\n") == END
    with Client(addresses(servers), write_policy="round_robin") as client:
        for k in range(9):
            assert client.put(QUEUE, b"%d" % k)
        assert stat(raws[1], QUEUE, "items") == 1
        assert stat(raws[0], QUEUE, "items") + stat(raws[2], QUEUE, "items") == 9
        got = drain(client)
    assert sorted(got) == sorted([b"before"] + [b"%d" % k for k in range(9)])


def test_quiescent_server_is_skipped_and_its_open_reads_still_confirm(servers, raws):
    for data in (b"held", b"stays"):
        assert raws[1].set(QUEUE, data) == STORED
    with Client(addresses(servers), write_policy="round_robin") as client:
        item = client.get_reliable(QUEUE)
        assert item.data == b"held"
        assert raws[1].call(b"status QUIESCENT\r\n") == END
        for k in range(6):
            assert client.put(QUEUE, b"%d" % k)
        assert sorted(drain(client)) == [b"%d" % k for k in range(6)]
        assert item.confirm() is True
    assert stat(raws[1], QUEUE, "open_transactions") == 0
    assert raws[1].call(b"status UP\r\n") == END
    assert drain_raw(raws[1], QUEUE) == [b"stays"]


def test_killed_server_loses_no_acknowledged_write(servers, raws):
    victim = servers[1]
    assert raws[1].set("work", b"in flight") == STORED
    with Client(addresses(servers), write_policy="round_robin", retry_after=3600) as client:
        held = client.get_reliable("work")
        assert held.server == ("127.0.0.1", victim.port)
        acked = []
        for k in range(30):
            assert client.put(QUEUE, b"%d" % k)
            acked.append(b"%d" % k)
        victim.kill()
        for k in range(30, 60):
            assert client.put(QUEUE, b"%d" % k)  # the others take the writes
            acked.append(b"%d" % k)
        assert held.confirm() is False and held.state == "lost"
        survivors = drain(client)
    on_victim = [b"%d" % k for k in range(1, 30, 3)]
    assert sorted(survivors) == sorted(set(acked) - set(on_victim))

    victim.start()
    with Client(addresses(servers)) as client:
        assert drain(client) == on_victim  # journaled: every acknowledged write is back
        back = client.get_reliable("work")
        assert back.data == b"in flight"  # the open read went back to its queue
        assert back.confirm()


def test_put_is_refused_only_when_every_server_refuses(servers, raws):
    for raw in raws:
        assert raw.call(b"status READONLY\r\n") == END
    with Client(addresses(servers)) as client:
        assert client.put(QUEUE, b"x") is False
    for proc in servers:
        proc.kill()
    with Client(addresses(servers), connect_timeout=5) as client:
        assert client.put(QUEUE, b"x") is False
        assert client.get(QUEUE) is None


# ---- asyncio twin -----------------------------------------------------------------------------
def test_async_client_writes_reads_and_confirms_on_the_right_server(servers, raws):
    placed = fill(raws, per_server=2)

    async def main() -> None:
        async with AsyncClient(addresses(servers), write_policy="round_robin") as client:
            got = []
            while (data := await client.get(QUEUE)) is not None:
                got.append(data)
            assert got == placed[0] + placed[1] + placed[2]
            for k in range(6):
                assert await client.put(QUEUE, b"%d" % k, flags=k)
            assert [stat(raw, QUEUE, "items") for raw in raws] == [2, 2, 2]
            with pytest.raises(TypeError):
                await client.put(QUEUE, 5)  # not five NUL bytes

            queue = hashes_apart(servers)
            assert raws[2].set(queue, b"payload", flags=9) == STORED
            item = await client.get_reliable(queue)
            assert (item.data, item.flags, item.server) == (b"payload", 9, client.servers[2])
            assert await item.abort()
            item = await client.get_reliable(queue)
            assert await client.get(queue) is None
            nxt = await client.get_reliable(queue, confirm=item)
            assert nxt is None and item.state == "confirmed"
            assert (stat(raws[2], queue, "items"), stat(raws[2], queue, "open_transactions")) == (
                0,
                0,
            )

    asyncio.run(main())


def test_async_blocking_get_waits_for_an_item_and_ends_at_its_bound(servers, raws):
    async def main() -> None:
        async with AsyncClient(addresses(servers)) as client:
            assert await client.get(QUEUE, timeout_ms=20) is None
            task = asyncio.ensure_future(client.get(QUEUE, timeout_ms=60_000))
            waiting = await asyncio.to_thread(
                poll,
                lambda: [raw for raw in raws if stat(raw, QUEUE, "waiters") == 1],
                "a blocked get on one server",
            )
            assert waiting[0].set(QUEUE, b"arrived") == STORED
            assert await asyncio.wait_for(task, 30) == b"arrived"

    asyncio.run(main())


def test_async_client_survives_a_killed_and_a_quiescent_server(servers, raws):
    victim = servers[0]
    assert raws[0].set("work", b"in flight") == STORED
    assert raws[2].set("work", b"held") == STORED

    async def main() -> list[bytes]:
        async with AsyncClient(addresses(servers), write_policy="round_robin") as client:
            lost = await client.get_reliable("work")
            assert lost.server == client.servers[0]
            held = await client.get_reliable("work")
            assert held.server == client.servers[2] and held.data == b"held"
            assert raws[2].call(b"status QUIESCENT\r\n") == END
            assert await client.get_reliable("work") is None  # refused, connection kept
            victim.kill()
            for k in range(12):
                assert await client.put(QUEUE, b"%d" % k)
            assert await lost.confirm() is False and lost.state == "lost"
            assert await held.confirm() is True
            got = []
            while (data := await client.get(QUEUE)) is not None:
                got.append(data)
            return got

    got = asyncio.run(main())
    assert sorted(got) == sorted(b"%d" % k for k in range(12))
    assert stat(raws[2], "work", "open_transactions") == 0
    victim.start()
    raw = victim.client()
    assert drain_raw(raw, "work") == [b"in flight"]  # the lost open read went back
    raw.close()


def test_public_classes_name_erq_client_as_their_module_and_errors_pickle():
    """Users import these from erq.client; reprs, tracebacks and pickles say so, not the
    private module the two clients share."""
    for cls in (AsyncClient, Client, ErqError, Item):
        assert cls.__module__ == "erq.client", cls
    error = pickle.loads(pickle.dumps(ErqError("CLIENT_ERROR bad data chunk")))
    assert type(error) is ErqError and str(error) == "CLIENT_ERROR bad data chunk"
