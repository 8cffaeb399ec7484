"""Queue policies end to end (PROTOCOL.md sections 7 and 10): every queue key's default, its
effect exactly at the boundary, and how it meets reliable reads and the journal, through a real
server process and socket, for both implementations.

Nothing here sleeps to hope: a change that only time brings (an expiry, a timeout, a sweep) is
polled for with a deadline, and a check that must not race a sweep first waits for the server's
first expiry sweep with ``expiry_sweep = "1d"``, after which no sweep comes for a day.
"""

from __future__ import annotations

import importlib
import signal
import time

import pytest

from conftest import ErqProcess, RawClient, impl_module
from support import (
    DEFAULT_CONFIG,
    DELETED,
    END,
    ERROR,
    NOT_STORED,
    READ_ONLY,
    RELOADED,
    STORED,
    TOO_LARGE,
    MiB,
    dump_config,
    one,
    parse_blocks,
    poll,
    queue_config,
    set_req,
    value,
)

QUIET_SWEEP = '[server]\nexpiry_sweep = "1d"\n'


# ---- helpers ---------------------------------------------------------------------------------
def qstats(c: RawClient, name: str) -> dict[str, str] | None:
    """One queue's ``dump_stats`` fields, or None when the queue does not exist."""
    return parse_blocks(c.call(b"dump_stats %s\r\n" % name.encode(), END)).get(name)


def qint(c: RawClient, name: str, field: str) -> int:
    stats = qstats(c, name)
    assert stats is not None, f"queue {name} does not exist"
    return int(stats[field])


def item_or_none(c: RawClient, key: str) -> bytes | None:
    """The reply to ``get key`` when it found an item, else None (for polling)."""
    reply = c.get(key)
    return None if reply == END else reply


def flush_expired(c: RawClient, name: str) -> int:
    return int(c.call(b"flush_expired %s\r\n" % name.encode()))


def drain(c: RawClient, name: str) -> list[bytes]:
    """Every item of ``name`` by plain gets, in the order the queue hands them out."""
    out = []
    while True:
        reply = c.get(name)
        if reply == END:
            return out
        head, _, rest = reply.partition(b"\r\n")
        size = int(head.split()[3])
        out.append(rest[:size])


def pipeline_sets(c: RawClient, queue: str, payloads: list[bytes], **kw) -> list[bytes]:
    """All sets in one send; the replies, in order."""
    c.send(b"".join(set_req(queue.encode(), p, **kw) for p in payloads))
    return [c.line() for _ in payloads]


def quiet_sweep(c: RawClient) -> None:
    """With ``expiry_sweep = "1d"``: wait until the server's first expiry sweep has run (it
    removes an already-expired sentinel without any request on its queue); the next sweep is a
    day away, so expired items stay until a get or ``flush_expired`` removes them."""
    assert c.set("sentinel", b"s", exptime=-1) == STORED
    poll(lambda: qint(c, "sentinel", "items") == 0, "the first expiry sweep")


def start(erq_factory, config: str | None = None, **kw) -> tuple[ErqProcess, RawClient]:
    proc = erq_factory(config=config, **kw)
    return proc, proc.client()


def restart(proc: ErqProcess, crash: bool) -> RawClient:
    """SIGKILL (``crash``) or graceful stop, start again, and a fresh client."""
    code = proc.stop(signal.SIGKILL if crash else signal.SIGTERM)
    assert code == (-signal.SIGKILL if crash else 0)
    proc.start()
    return proc.client()


# ---- defaults and dump_config ------------------------------------------------------------------
def test_defaults_impose_no_limits_and_dump_config_shows_them_canonically(erq_factory):
    proc, c = start(erq_factory)
    assert c.set("q", b"x") == STORED
    assert dump_config(c, "q") == {"q": DEFAULT_CONFIG}
    assert list(dump_config(c, "q")["q"]) == list(DEFAULT_CONFIG)  # the spec's key order
    # max_items / max_size none: nothing is ever full.
    assert pipeline_sets(c, "q", [b"%03d" % i * 25 for i in range(400)]) == [STORED] * 400
    # max_item_size none: the server's 64 MiB applies, a 1 MiB item is fine.
    assert c.set("big", b"b" * MiB) == STORED
    # expiry none, open_timeout none: an item and an open read stay as they are.
    assert c.get("q/open") == one("q/open", b"x")
    stats = qstats(c, "q")
    assert (stats["items"], stats["open_transactions"], stats["discarded"]) == ("400", "1", "0")
    assert stats["expired_items"] == "0" and stats["canceled_transactions"] == "0"
    # dump_config of a queue that does not exist shows nothing and creates nothing.
    assert c.call(b"dump_config nosuch\r\n", END) == END
    assert qstats(c, "nosuch") is None
    # journal true: everything (the open read back at the head) survives a crash.
    c = restart(proc, crash=True)
    assert qint(c, "q", "items") == 401 and qint(c, "big", "bytes") == MiB
    assert c.get("q") == one("q", b"x")


def test_dump_config_shows_overrides_defaults_and_fanout_inheritance_canonically(erq_factory):
    config = """
[queues.default]
max_age = "1m"
max_memory_size = "64MiB"

[queues."o"]
max_items = 5
max_size = "4KiB"
max_item_size = "1KiB"
max_memory_size = 2048
max_journal_size = "64MiB"
max_age = "2s"
max_queue_age = "1h"
open_timeout = "30s"
discard_old_when_full = true
journal = false
expire_to_queue = "dead"
fsync = "always"

[queues."o+k"]
fsync = "50ms"
max_items = "none"

[queues."n"]
fsync = "never"
max_journal_size = 65536
max_age = "none"
"""
    proc, c = start(erq_factory, config)
    for name in ("plain", "plain+k", "o", "o+k", "n"):
        assert c.get(name) == END  # creates the queue
    got = dump_config(c, "plain", "o", "o+k", "n", "plain+k", "absent")
    assert list(got) == ["plain", "o", "o+k", "n", "plain+k"]  # the order asked; absent left out
    defaults = dict(DEFAULT_CONFIG, max_age="60000", max_memory_size=str(64 * MiB))
    assert got["plain"] == defaults
    assert got["plain+k"] == defaults  # a child of an unconfigured parent: the defaults
    override = {
        "max_items": "5",
        "max_size": "4096",
        "max_item_size": "1024",
        "max_memory_size": "2048",
        "max_journal_size": str(64 * MiB),
        "max_age": "2000",
        "max_queue_age": "3600000",
        "open_timeout": "30000",
        "discard_old_when_full": "true",
        "journal": "false",
        "expire_to_queue": "dead",
        "fsync": "always",
    }
    assert got["o"] == override
    assert got["o+k"] == dict(override, fsync="50", max_items="none")  # inherits, then its own
    assert got["n"] == dict(defaults, fsync="never", max_journal_size="65536", max_age="none")
    # Without names: every existing queue.
    assert sorted(dump_config(c)) == ["n", "o", "o+k", "plain", "plain+k"]


# ---- max_items, max_size, max_item_size --------------------------------------------------------
def test_queue_is_full_when_items_or_bytes_reach_the_limit_before_the_add_not_counting_open_reads(
    erq_factory,
):
    config = """
[queues."q"]
max_items = 2
[queues."s"]
max_size = 10
[queues."zero"]
max_items = 0
[queues."zerob"]
max_size = 0
"""
    proc, c = start(erq_factory, config)
    # max_items = 2: two fit, the third is refused; a refusal counts nowhere.
    assert c.set("q", b"a") == STORED
    assert c.set("q", b"b") == STORED
    assert c.set("q", b"c") == NOT_STORED
    stats = qstats(c, "q")
    assert (stats["items"], stats["total_items"], stats["discarded"]) == ("2", "2", "0")
    # An open read leaves items: the queue takes one more; its return may overfill the queue.
    assert c.get("q/open") == one("q/open", b"a")
    assert c.set("q", b"c") == STORED
    assert c.set("q", b"d") == NOT_STORED
    assert c.get("q/abort") == END
    assert qint(c, "q", "items") == 3
    assert c.set("q", b"d") == NOT_STORED
    assert drain(c, "q") == [b"a", b"b", b"c"]
    # max_size = 10: full once bytes >= 10 before the add (an add may overshoot the limit).
    assert c.set("s", b"123456789") == STORED  # 0 < 10
    assert c.set("s", b"X") == STORED  # 9 < 10, now exactly 10
    assert c.set("s", b"Y") == NOT_STORED  # 10 >= 10
    assert c.get("s/open") == one("s/open", b"123456789")  # bytes 1: room again
    assert c.set("s", b"a much longer item than ten bytes") == STORED  # 1 < 10
    assert qint(c, "s", "bytes") == 34
    assert c.set("s", b"Z") == NOT_STORED
    assert c.get("s/close") == END
    assert drain(c, "s") == [b"X", b"a much longer item than ten bytes"]
    # A limit of zero refuses every item, empty ones included.
    assert c.set("zero", b"x") == NOT_STORED
    assert c.set("zerob", b"") == NOT_STORED
    # Refused items are not in the journal either.
    c = restart(proc, crash=True)
    assert qint(c, "s", "items") == 0 and qint(c, "q", "items") == 0
    assert c.get("zero") == END and c.get("zerob") == END


def test_queue_max_item_size_refuses_with_not_stored_server_limit_with_too_large(erq_factory):
    config = """
[server]
max_item_size = 1024
[queues."small"]
max_item_size = 100
[queues."big"]
max_item_size = "1MiB"
"""
    proc, c = start(erq_factory, config)
    assert c.set("small", b"s" * 100) == STORED
    assert c.set("small", b"s" * 101) == NOT_STORED
    assert c.set("small", b"s" * 1025) == TOO_LARGE  # the server's limit is checked first
    assert c.set("big", b"b" * 1024) == STORED
    assert c.set("big", b"b" * 1025) == TOO_LARGE  # a larger queue limit does not lift it
    assert c.set("other", b"o" * 1024) == STORED
    assert c.set("other", b"o" * 1025) == TOO_LARGE
    assert c.call(b"version\r\n").startswith(b"VERSION ")  # the connection stays open
    assert [qint(c, q, "total_items") for q in ("small", "big", "other")] == [1, 1, 1]
    assert c.stats()["total_items"] == "3"


def test_a_limit_of_zero_refuses_every_item_even_when_discarding_old_ones(erq_factory):
    config = """
[queues."n"]
max_items = 0
discard_old_when_full = true
[queues."b"]
max_size = 0
discard_old_when_full = true
[queues."n0"]
max_items = 0
"""
    proc, c = start(erq_factory, config)
    for queue in ("n", "b", "n0"):
        assert pipeline_sets(c, queue, [b"1", b"2"]) == [NOT_STORED] * 2, queue
        assert qstats(c, queue) is None  # a refused set creates no queue


def test_discard_old_when_full_drops_from_the_head_counts_discarded_and_stays_dropped(
    erq_factory,
):
    config = """
[queues."d"]
max_items = 3
discard_old_when_full = true
[queues."ds"]
max_size = 10
discard_old_when_full = true
"""
    proc, c = start(erq_factory, config)
    assert pipeline_sets(c, "d", [b"1", b"2", b"3", b"4", b"5"]) == [STORED] * 5
    stats = qstats(c, "d")
    assert (stats["items"], stats["discarded"], stats["total_items"]) == ("3", "2", "5")
    assert c.get("d/peek") == one("d/peek", b"3")
    # By bytes: 4 + 4 = 8 < 10 takes a third (12); the fourth first drops the head (8).
    assert pipeline_sets(c, "ds", [b"aaaa", b"bbbb", b"cccc", b"dddd"]) == [STORED] * 4
    assert (qint(c, "ds", "discarded"), qint(c, "ds", "bytes")) == (1, 12)
    # Open reads are not discarded and not counted: with "3" open, "4" "5" fill 2 of 3.
    assert c.get("d/open") == one("d/open", b"3")
    assert c.set("d", b"6") == STORED
    assert qint(c, "d", "discarded") == 2
    assert c.set("d", b"7") == STORED  # full (4 5 6): drops "4"
    assert qint(c, "d", "discarded") == 3
    # A crash: discarded items stay gone, the open read comes back at the head.
    c = restart(proc, crash=True)
    assert qint(c, "d", "items") == 4
    assert c.get("d/peek") == one("d/peek", b"3")
    assert qint(c, "ds", "items") == 3
    assert c.set("d", b"8") == STORED  # drops "3" and "5"
    assert qint(c, "d", "discarded") == 2
    # A graceful restart: the same.
    c = restart(proc, crash=False)
    assert drain(c, "d") == [b"6", b"7", b"8"]
    assert drain(c, "ds") == [b"bbbb", b"cccc", b"dddd"]


# ---- expiry -------------------------------------------------------------------------------------
def _expiry_case(c: RawClient, name: str, exptime: int, alive: bool, key: str | None = None):
    assert c.set(name, b"v", flags=3, exptime=exptime) == STORED
    reply = c.get(name)
    if alive:
        assert reply == (one(name, b"v", 3) if key is None else one(key, b"v")), (name, exptime)
        assert qint(c, name, "expired_items") == 0
    else:
        assert reply == END, (name, exptime)
        assert qint(c, name, "expired_items") == 1, (name, exptime)


def test_exptime_zero_never_relative_up_to_thirty_days_absolute_beyond_negative_expired(
    erq_factory,
):
    proc, c = start(erq_factory)
    now = int(time.time())
    _expiry_case(c, "zero", 0, alive=True)
    _expiry_case(c, "rel", 2_592_000, alive=True)  # 30 days from now
    _expiry_case(c, "abs1970", 2_592_001, alive=False)  # 31 Jan 1970
    _expiry_case(c, "kthresh", 1_500_000, alive=True)  # relative: only Kestrel calls it absolute
    _expiry_case(c, "future", now + 3600, alive=True)
    _expiry_case(c, "past", now - 3600, alive=False)
    _expiry_case(c, "neg", -1, alive=False)
    _expiry_case(c, "negbig", -2_592_001, alive=False)
    _expiry_case(c, "far", 2**63 - 1, alive=True)  # the largest exptime the protocol takes


def test_kestrel_compat_makes_one_million_seconds_the_absolute_threshold(erq_factory):
    proc, c = start(erq_factory, args=["--compat", "kestrel"])
    now = int(time.time())
    _expiry_case(c, "zero", 0, alive=True, key="zero")
    _expiry_case(c, "rel", 999_999, alive=True, key="rel")
    _expiry_case(c, "abs", 1_000_000, alive=False)  # Kestrel: relative below 1,000,000 only
    _expiry_case(c, "abs1", 1_000_001, alive=False)
    _expiry_case(c, "k15", 1_500_000, alive=False)  # 1970 under Kestrel's rule
    _expiry_case(c, "future", now + 3600, alive=True, key="future")
    _expiry_case(c, "neg", -1, alive=False)


def test_expired_heads_go_lazily_at_get_and_by_flush_expired_and_stay_gone(erq_factory):
    proc, c = start(erq_factory, QUIET_SWEEP)
    quiet_sweep(c)
    # Lazy removal: the get skips (and counts) expired heads, then returns the live item.
    for exptime in (-1, -1, 0, -1):
        assert c.set("lazy", b"e%d" % exptime, exptime=exptime) == STORED
    assert qint(c, "lazy", "items") == 4  # nothing removed them yet
    assert c.get("lazy") == one("lazy", b"e0")
    stats = qstats(c, "lazy")
    assert (stats["items"], stats["expired_items"]) == ("1", "2")
    assert c.get("lazy") == END
    assert qint(c, "lazy", "expired_items") == 3
    # flush_expired answers how many it removed; a 1-second item is polled until it expires.
    assert pipeline_sets(c, "f", [b"a", b"b", b"c"], exptime=-1) == [STORED] * 3
    assert c.set("f", b"live") == STORED
    assert flush_expired(c, "f") == 3
    assert flush_expired(c, "f") == 0
    assert c.set("one", b"soon", exptime=1) == STORED
    assert c.set("one", b"later", exptime=0) == STORED
    assert poll(lambda: flush_expired(c, "one"), "a 1 s item to expire") == 1
    assert (qint(c, "one", "items"), qint(c, "one", "expired_items")) == (1, 1)
    assert c.call(b"flush_expired nosuch\r\n") == b"0\r\n"
    assert qstats(c, "nosuch") is None
    # Expired items removed before a crash or a restart do not come back.
    for crash in (True, False):
        c = restart(proc, crash)
        assert qint(c, "f", "items") == 1 and qint(c, "one", "items") == 1
        assert qint(c, "lazy", "items") == 0
    assert c.get("f") == one("f", b"live") and c.get("one") == one("one", b"later")


def test_expiry_sweep_removes_expired_heads_without_any_request(erq_factory):
    config = """
[server]
expiry_sweep = "100ms"
[queues."sw"]
expire_to_queue = "swdead"
"""
    proc, c = start(erq_factory, config)
    assert c.set("q", b"one second", exptime=1) == STORED
    assert c.set("q2", b"expired", exptime=-1) == STORED
    assert c.set("sw", b"moved", flags=5, exptime=1) == STORED
    assert c.set("keep", b"forever") == STORED
    poll(lambda: qint(c, "q", "items") == 0, "the sweep to remove q's head")
    poll(lambda: qint(c, "q2", "items") == 0, "the sweep to remove q2's head")
    poll(lambda: qint(c, "sw", "items") == 0, "the sweep to remove sw's head")
    assert [qint(c, q, "expired_items") for q in ("q", "q2", "sw", "keep")] == [1, 1, 1, 0]
    assert qint(c, "keep", "items") == 1
    assert c.get("swdead") == one("swdead", b"moved", 5)


def test_max_age_caps_expiry_of_items_with_none_or_a_later_one(erq_factory):
    config = """
[queues."m"]
max_age = "300ms"
[queues."long"]
max_age = "1d"
"""
    proc, c = start(erq_factory, config)
    assert c.set("m", b"no expiry", exptime=0) == STORED
    assert c.set("m", b"one hour", exptime=3600) == STORED
    assert c.set("m", b"expired", exptime=-1) == STORED  # an earlier expiry is kept

    def all_expired():
        flush_expired(c, "m")
        return qint(c, "m", "expired_items") == 3

    poll(all_expired, "max_age to expire both capped items")
    assert qint(c, "m", "items") == 0 and c.get("m") == END
    # A cap that is later than the item's own expiry changes nothing.
    assert c.set("long", b"gone", exptime=-1) == STORED
    assert c.set("long", b"stays", exptime=0) == STORED
    assert c.get("long") == one("long", b"stays")
    assert qint(c, "long", "expired_items") == 1
    c = restart(proc, crash=True)
    assert qint(c, "m", "items") == 0


def test_max_age_is_written_into_items_as_they_are_set_so_a_reload_caps_later_ones(erq_factory):
    """As in Kestrel (adjustExpiry at add), and as example.toml says: the cap goes into the
    item's expiry at its set. A reload that sets max_age caps the items set after it; an item
    queued before keeps its own expiry, through a restart too."""
    proc, c = start(erq_factory, QUIET_SWEEP)
    assert c.set("m", b"before", exptime=0) == STORED
    proc.write_config(QUIET_SWEEP + '[queues."m"]\nmax_age = "200ms"\n')
    assert c.call(b"reload\r\n") == RELOADED
    assert c.set("m", b"after", exptime=0) == STORED
    time.sleep(0.3)  # past the cap of both items, had it applied to both
    c = restart(proc, crash=True)
    assert c.get("m") == one("m", b"before")
    assert c.get("m") == END
    assert qint(c, "m", "expired_items") == 1 and qint(c, "m", "items") == 0


def test_expire_to_queue_moves_expired_items_with_flags_and_without_expiry(erq_factory):
    config = (
        QUIET_SWEEP
        + """
[queues."e"]
expire_to_queue = "dead"
[queues."em"]
expire_to_queue = "dead"
max_age = "200ms"
[queues."dead"]
expire_to_queue = "dead"
"""
    )
    proc, c = start(erq_factory, config)
    quiet_sweep(c)
    before = int(c.stats()["total_items"])
    assert c.set("e", b"first", flags=7, exptime=-1) == STORED
    assert c.set("e", b"second", flags=9, exptime=-1) == STORED
    assert c.set("e", b"live", flags=3) == STORED
    assert flush_expired(c, "e") == 2
    stats = qstats(c, "e")
    assert (stats["items"], stats["expired_items"]) == ("1", "2")
    assert qint(c, "dead", "items") == 2
    assert int(c.stats()["total_items"]) == before + 5  # 3 sets + 2 moves into "dead"
    # Lazily at a get, too.
    assert c.set("e", b"third", flags=11, exptime=-1) == STORED
    assert c.get("e") == one("e", b"live", 3)
    assert c.get("e") == END
    assert qint(c, "e", "expired_items") == 3
    # max_age expiry moves as well; the moved copy has no expiry (its own would have passed).
    assert c.set("em", b"aged", flags=13) == STORED

    def moved():
        flush_expired(c, "em")
        return qint(c, "em", "expired_items") == 1

    poll(moved, "max_age to expire the item in em")
    # The moved items neither come back to their queues nor vanish from "dead" after a restart.
    for crash in (True, False):
        c = restart(proc, crash)
        assert qint(c, "e", "items") == 0 and qint(c, "em", "items") == 0
        assert qint(c, "dead", "items") == 4
    assert c.get("dead") == one("dead", b"first", 7)
    assert c.get("dead") == one("dead", b"second", 9)
    assert c.get("dead") == one("dead", b"third", 11)
    assert c.get("dead") == one("dead", b"aged", 13)
    assert qint(c, "dead", "expired_items") == 0
    # A queue named as its own target drops its expired items: it does not feed itself (the
    # case of a [queues.default] naming the target).
    assert c.set("dead", b"gone", exptime=-1) == STORED
    assert flush_expired(c, "dead") == 1
    assert (qint(c, "dead", "items"), qint(c, "dead", "expired_items")) == (0, 1)
    # dump_config gives the effective configuration (PROTOCOL §3): none for that queue.
    assert queue_config(c, "dead")["expire_to_queue"] == "none"
    assert queue_config(c, "e")["expire_to_queue"] == "dead"


def test_an_expiry_move_whose_woken_get_fetches_from_the_source_loses_and_doubles_nothing(impl):
    """The move of an expired item to expire_to_queue can wake a get blocked there, whose next
    key fetches from the source queue at once, while the source is still removing that item.
    The fetch met the item again (moved a second time) and took the next one, and the removal
    then dropped the item after it: one item doubled, one lost."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    moves: list[bytes] = []
    fetched: list = []

    def on_expired(queue, item) -> bool:  # the move, and the woken get's next key
        moves.append(item.data)
        fetched.append(queue.take(False))
        return False

    now = [1_000]
    queue = queue_mod.Queue("src", QueueConfig(), None, clock=lambda: now[0], on_expired=on_expired)
    queue.add(b"x", 0, 1_500)
    queue.add(b"y", 0, 0)
    queue.add(b"z", 0, 0)
    now[0] = 2_000
    assert queue.discard_expired() == 1
    assert moves == [b"x"]  # moved once
    assert [item.data for item in fetched] == [b"y"]
    assert (queue.items, queue.expired_items) == (1, 1)
    assert queue.take(False).data == b"z"  # not lost


def test_a_get_woken_by_an_expiry_move_fetches_from_the_source_without_loss(erq_factory):
    config = QUIET_SWEEP + '[queues."src"]\nexpire_to_queue = "dst"\n'
    proc, c = start(erq_factory, config)
    quiet_sweep(c)
    assert pipeline_sets(c, "src", [b"x"], exptime=-1) == [STORED]
    assert pipeline_sets(c, "src", [b"y", b"z"]) == [STORED] * 2
    waiter = proc.client()
    waiter.send(b"get dst/t=5000 src\r\n")
    poll(lambda: (qstats(c, "dst") or {}).get("waiters") == "1", "the get to block on dst")
    assert flush_expired(c, "src") == 1  # x moves to dst: the get takes it, then y from src
    assert waiter.until() == value("dst/t=5000", b"x") + value("src", b"y") + END
    assert drain(c, "src") == [b"z"]
    assert drain(c, "dst") == []  # moved once
    assert (qint(c, "src", "expired_items"), qint(c, "dst", "total_items")) == (1, 1)


def test_a_crash_while_expired_items_move_loses_none_of_them(erq_factory):
    """A SIGKILL while the sweep moves expired items to their expire_to_queue (fsync =
    "always": each leaves its queue once its copy is synced): after the restart every item
    is in the target, at least once and at most twice (a copy made before the crash, whose
    removal was not journaled yet, is moved again: example.toml says so), none anywhere
    else."""
    config = """
[server]
expiry_sweep = "100ms"
[queues."ex"]
fsync = "always"
expire_to_queue = "exdead"
[queues."exdead"]
fsync = "always"
"""
    proc, c = start(erq_factory, config)
    payloads = [b"%04d" % i for i in range(300)]
    assert pipeline_sets(c, "ex", payloads, exptime=1) == [STORED] * len(payloads)
    poll(
        lambda: int((qstats(c, "exdead") or {}).get("items", 0)) > 0,
        "the sweep to move the first expired items",
    )
    c = restart(proc, crash=True)
    poll(lambda: qint(c, "ex", "items") == 0, "the sweep to move the rest after the restart")
    moved = drain(c, "exdead")
    assert set(moved) == set(payloads), sorted(set(payloads) - set(moved))[:10]
    assert max(moved.count(p) for p in payloads) <= 2
    assert drain(c, "ex") == []


def test_expired_item_refused_by_an_expire_to_queue_is_not_counted_and_makes_no_queue(erq_factory):
    config = (
        QUIET_SWEEP
        + """
[queues."src"]
expire_to_queue = "full"
[queues."full"]
max_items = 0
"""
    )
    proc, c = start(erq_factory, config)
    quiet_sweep(c)
    assert c.set("src", b"x", exptime=-1) == STORED
    before = c.stats()
    assert flush_expired(c, "src") == 1
    assert qint(c, "src", "expired_items") == 1
    # "Counts are exact": an item the target refused was stored nowhere.
    after = c.stats()
    assert after["total_items"] == before["total_items"]
    # ... and the loss is logged (Kestrel drops it silently).
    assert "queue src: expired item 1 dropped, full refused it: it is full" in proc.read_log()
    # The target made for the move went again (PROTOCOL §10: a queue is made only for what it
    # accepts): it does not count against max_queues, nor come back after a restart.
    assert qstats(c, "full") is None
    assert after["queue_creates"] == before["queue_creates"]
    assert after["queue_deletes"] == before["queue_deletes"]
    c = restart(proc, crash=False)
    assert qstats(c, "full") is None
    # A target that exists already stays when it refuses: someone made it.
    assert c.get("full") == END
    assert c.set("src", b"y", exptime=-1) == STORED
    assert flush_expired(c, "src") == 1
    assert qint(c, "full", "total_items") == 0
    # One too large for the target is dropped the same way, and the log says why (it said
    # "it is full" for every refusal).
    proc.write_config(config.replace("max_items = 0", "max_item_size = 1"))
    c = restart(proc, crash=False)  # (a drop's log line is throttled: a new process logs it)
    assert c.set("src", b"two", exptime=-1) == STORED
    assert flush_expired(c, "src") == 1
    assert "full refused it: over its max_item_size (1 bytes)" in proc.read_log()
    assert qint(c, "full", "total_items") == 0


# ---- max_queue_age -----------------------------------------------------------------------------
def test_max_queue_age_deletes_an_empty_idle_queue_only(erq_factory):
    config = """
[queues.default]
max_queue_age = "300ms"
"""
    proc, c = start(erq_factory, config)
    holder = proc.client()
    assert c.set("busy", b"x") == STORED
    assert c.set("held", b"y") == STORED
    assert holder.get("held/open") == one("held/open", b"y")  # empty, but a read is open
    assert c.get("idle") == END  # created empty
    poll(lambda: qstats(c, "idle") is None, "the idle queue to be deleted")
    stats = c.stats()
    assert (stats["queue_expires"], stats["queue_deletes"]) == ("1", "0")
    # The same sweep saw "busy" and "held", idle for longer: neither is deleted.
    assert qint(c, "busy", "items") == 1
    assert qint(c, "held", "open_transactions") == 1
    assert holder.get("held/close") == END
    # A deleted queue does not come back after a restart.
    c = restart(proc, crash=False)
    assert qstats(c, "idle") is None and qint(c, "busy", "items") == 1


def test_max_queue_age_counts_from_the_last_take_or_confirm_not_only_the_last_set(erq_factory):
    """A queue a get has just emptied, or whose last read was just confirmed, is not idle:
    it stays for max_queue_age from then (it was deleted at the next sweep when its last
    set was older than that)."""
    config = """
[server]
expiry_sweep = "100ms"

[queues.default]
max_queue_age = "1500ms"
"""
    proc, c = start(erq_factory, config)
    assert c.set("taken", b"x") == STORED
    assert c.set("confirmed", b"y") == STORED
    assert c.get("confirmed/open") == one("confirmed/open", b"y")
    time.sleep(1.0)
    assert c.get("taken") == one("taken", b"x")  # empty from now on
    time.sleep(0.8)  # 1.8 s after its set, 0.8 s after the get
    assert qint(c, "taken", "total_items") == 1
    assert c.get("confirmed/close") == END  # 1.8 s after the open: the last activity is now
    time.sleep(0.8)
    assert qint(c, "confirmed", "total_items") == 1
    poll(lambda: qstats(c, "taken") is None, "the emptied queue to be deleted in its turn")
    poll(lambda: qstats(c, "confirmed") is None, "the confirmed queue to be deleted in its turn")
    assert c.stats()["queue_expires"] == "2"


# ---- open_timeout ------------------------------------------------------------------------------
OPEN_TIMEOUT = """
[queues."t"]
open_timeout = "300ms"
"""


def test_open_timeout_returns_a_read_to_the_head_by_the_timer_and_at_a_fetch(erq_factory):
    proc, a = start(erq_factory, OPEN_TIMEOUT)
    b = proc.client()
    assert pipeline_sets(a, "t", [b"x", b"y"]) == [STORED] * 2
    # The timer: with no request on the queue the read goes back to the head.
    assert a.get("t/open") == one("t/open", b"x")
    poll(lambda: qint(a, "t", "open_transactions") == 0, "the open read to time out")
    stats = qstats(a, "t")
    assert (stats["items"], stats["canceled_transactions"]) == ("2", "1")
    assert b.get("t") == one("t", b"x")  # handed out next
    # At a fetch (or by the timer, whichever comes first): a polling reader gets the item back.
    assert a.get("t/open") == one("t/open", b"y")
    assert poll(lambda: item_or_none(b, "t"), "y to come back at a fetch") == one("t", b"y")
    assert qint(a, "t", "canceled_transactions") == 2  # counted once, whoever returned it
    stats = qstats(a, "t")
    assert (stats["items"], stats["open_transactions"]) == ("0", "0")


def _waiter_type(queue_mod):
    """A blocked get as the queue sees it (erq.commands.KeyWaiter): it records what it got.
    A subclass of the build's own Waiter, as the compiled queue requires."""

    class Recording(queue_mod.Waiter):
        def __init__(self, reliable: bool = False) -> None:
            super().__init__(peek=False, reliable=reliable)
            self.got: list = []

        def wake(self, item) -> None:
            self.active = False
            self.got.append(item)

        def gone(self) -> bool:
            return False

    return Recording


def test_waiters_removed_from_anywhere_in_the_line_are_never_served_and_the_rest_keep_order(
    impl,
):
    """Blocked gets that time out or whose client leaves are taken out of the line as they
    reach its front, or all at once when they are more than half of it (a removal from the
    middle of 10,000 waiters was a walk of the line each); the others are served first come,
    first served, and a removal during a round of serving is safe."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    queue = queue_mod.Queue("t", QueueConfig(), None, clock=lambda: 1_000)

    recording = _waiter_type(queue_mod)

    class Leaving(recording):  # its hand-out makes a later waiter's client leave
        def wake(self, item) -> None:
            super().wake(item)
            queue.remove_waiter(waiters[9])

    waiters = [Leaving() if i == 3 else recording() for i in range(300)]
    for waiter in waiters:
        queue.add_waiter(waiter)
    gone = [w for i, w in enumerate(waiters) if i % 3 or i == 0]  # the front one included
    for waiter in gone:
        queue.remove_waiter(waiter)
        assert not waiter.active
    assert queue.waiter_count == 99
    queue.remove_waiter(gone[5])  # twice: nothing more happens
    live = [w for w in waiters if w not in gone]
    for n in range(101):
        queue.add(b"%d" % n, 0, 0)
    served = [w for w in live if w.got]
    assert served == [w for w in live if w is not waiters[9]]
    assert [w.got[0].data for w in served] == [b"%d" % n for n in range(98)]
    assert not any(w.got for w in gone) and not waiters[9].got
    assert queue.items == 3 and queue.waiter_count == 0


def test_a_waiter_line_takes_only_waiters(impl):
    """The compiled queue reads its waiters' fields in C: what is not a Waiter (None too,
    which a typed argument lets through) is refused by both builds before it reaches the
    line."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    queue = queue_mod.Queue("t", QueueConfig(), None, clock=lambda: 1_000)
    for method in (queue.add_waiter, queue.remove_waiter):
        for stranger in (None, object()):
            with pytest.raises(TypeError):
                method(stranger)
    assert queue.waiter_count == 0
    queue.add(b"x", 0, 0)
    assert queue.items == 1


def test_reads_closed_out_of_order_leave_the_timeout_to_the_oldest_still_open(impl):
    """The reads past open_timeout are found from the oldest opened; reads closed since
    (confirmed, aborted) are passed over, in any order and any number."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    now = [1_000]
    queue = queue_mod.Queue("t", QueueConfig(open_timeout=1_000), None, clock=lambda: now[0])
    for n in range(500):
        queue.add(b"%d" % n, 0, 0)
    reads = []
    for n in range(500):
        now[0] = 1_000 + n
        reads.append(queue.open_read(queue.take(True).id))
    kept = reads[::50]  # opened at 1000, 1050, ...; the rest closed, newest first
    aborted = 0
    for read in reversed(reads):
        if read not in kept:
            if read.item.data[-1] % 2:
                assert queue.confirm(read)
            else:
                assert queue.unremove(read)
                aborted += 1
    assert queue.open_count == 10 and queue.items == aborted  # the aborted went back
    now[0] = 2_120  # past the timeout: those opened at 1000, 1050 and 1100
    assert queue.expire_open_reads(now[0]) == 3 and queue.open_count == 7
    assert [queue.take(False).data for _ in range(3)] == [b"0", b"50", b"100"]
    now[0] = 3_000
    assert queue.expire_open_reads(now[0]) == 7 and queue.open_count == 0


def test_an_open_timeout_set_by_a_reload_times_out_the_reads_already_open_oldest_first(impl):
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    now = [1_000]
    queue = queue_mod.Queue("t", QueueConfig(), None, clock=lambda: now[0])
    for n in range(4):
        queue.add(b"%d" % n, 0, 0)
    reads = [queue.open_read(queue.take(True).id) for _ in range(4)]
    assert queue.confirm(reads[1])
    queue.configure(QueueConfig(open_timeout=100))
    now[0] = 1_100
    assert queue.expire_open_reads(now[0]) == 3
    assert [queue.take(True).data for _ in range(3)] == [b"0", b"2", b"3"]
    queue.configure(QueueConfig())  # off, then on again: the reads open then, in order
    now[0] = 1_200
    assert queue.expire_open_reads(now[0]) == 0 and queue.open_count == 3
    queue.configure(QueueConfig(open_timeout=50))
    assert queue.expire_open_reads(now[0]) == 3
    assert [queue.take(False).data for _ in range(3)] == [b"0", b"2", b"3"]


def test_a_set_that_finds_a_timed_out_read_serves_a_waiter_once_and_keeps_its_item(impl):
    """A set serves the blocked gets; the waiter's fetch returns a read whose open_timeout has
    passed (not yet by the timer), and putting it back serves the waiters too. That inner
    round handed the returned item to the waiter, then the outer one took the new item for the
    same waiter: IndexError from an empty waiter line, the set unanswered and its item gone."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    now = [1_000]
    queue = queue_mod.Queue("t", QueueConfig(open_timeout=100), None, clock=lambda: now[0])
    queue.add(b"x", 0, 0)
    read = queue.take(True)
    assert read.data == b"x"
    waiter = _waiter_type(queue_mod)()
    queue.add_waiter(waiter)
    now[0] = 1_200  # x's read is 200 ms old: timed out, and no timer has returned it yet
    assert queue.add(b"y", 0, 0)[0] == queue_mod.STORED
    assert [item.data for item in waiter.got] == [b"x"]  # once, the returned read first
    assert (queue.items, queue.open_count, queue.canceled_transactions) == (1, 0, 1)
    assert queue.take(False).data == b"y"


def test_open_reads_past_their_timeout_are_the_oldest_and_go_back_oldest_at_the_head(impl):
    """Every fetch returns the reads past open_timeout first. They are the oldest opened, so
    the look stops at the first read that is not past it (a scan of every read open made each
    get cost in proportion to the reads held open on its queue); those returned go back in
    the order they were opened, the oldest at the head."""
    from erq.config import QueueConfig

    queue_mod = impl_module(impl, "_queue", "_queue_py")
    now = [1_000]
    queue = queue_mod.Queue("t", QueueConfig(open_timeout=100), None, clock=lambda: now[0])
    for data in (b"a", b"b", b"c", b"d", b"e"):
        queue.add(data, 0, 0)
    opened = {}
    for at, data in ((1_000, b"a"), (1_010, b"b"), (1_050, b"c"), (1_090, b"d")):
        now[0] = at
        opened[data] = queue.take(True)
        assert opened[data].data == data
    now[0] = 1_120  # a and b are past the timeout, c and d are not
    assert queue.peek().data == b"a" and queue.canceled_transactions == 2
    assert [queue.take(False).data for _ in range(3)] == [b"a", b"b", b"e"]
    assert queue.open_count == 2 and queue.take(False) is None
    now[0] = 1_160  # c now
    assert queue.take(False).data == b"c" and queue.open_count == 1
    assert queue.expire_open_reads(1_189) == 0 and queue.expire_open_reads(1_190) == 1
    assert queue.take(False).data == b"d" and queue.open_count == 0


def test_a_set_meeting_a_timed_out_read_and_a_blocked_get_keeps_both_items(erq_factory):
    """End to end: the timed-out read goes to the blocked get, the new item stays queued and
    the set is answered (the race with the once-a-second timer ends the same either way)."""
    proc, a = start(erq_factory, '[queues."t"]\nopen_timeout = "100ms"\n')
    waiter, setter = proc.client(), proc.client()
    for round_ in range(3):
        assert a.set("t", b"x%d" % round_) == STORED
        assert a.get("t/open") == one("t/open", b"x%d" % round_)
        waiter.send(b"get t/t=5000\r\n")
        time.sleep(0.15)  # past open_timeout; the timer usually has not run yet
        assert setter.set("t", b"y%d" % round_) == STORED
        assert waiter.until() == one("t/t=5000", b"x%d" % round_)
        assert setter.get("t") == one("t", b"y%d" % round_)
        assert a.get("t/close") == END  # used up by the timed-out read
    assert qint(setter, "t", "items") == 0
    assert "Traceback" not in proc.read_log()


def test_a_read_past_its_open_timeout_is_returned_before_the_checks_of_a_fetch(erq_factory):
    """open_timeout is enforced at every fetch (PROTOCOL §10): a read past it is no longer
    held when the connection's next get is checked, so neither a plain get (ERROR and close
    while a read is held) nor an /open at max_open_reads is refused for it. The outcome
    depended on whether the once-a-second timer had come first."""
    config = '[server]\nmax_open_reads = 2\n[queues."t"]\nopen_timeout = "100ms"\n'
    proc, c = start(erq_factory, config)
    for round_ in range(3):
        worker = proc.client()
        assert pipeline_sets(c, "t", [b"a", b"b", b"c"]) == [STORED] * 3
        assert worker.get("t/open") == one("t/open", b"a")
        time.sleep(0.15)  # past open_timeout; the timer usually has not run yet
        assert worker.get("t") == one("t", b"a"), round_
        assert worker.get("t/open") == one("t/open", b"b")
        assert worker.get("t/open") == one("t/open", b"c")  # the limit: two reads held
        time.sleep(0.15)
        assert worker.get("t/open") == one("t/open", b"b"), round_  # both back, oldest first
        worker.close()  # its open read of b goes back
        poll(lambda: qint(c, "t", "items") == 2, "the worker's read to come back")
        assert drain(c, "t") == [b"b", b"c"]
    # monitor stops at max_open_reads the same way: not for reads past open_timeout.
    worker = proc.client()
    assert pipeline_sets(c, "t", [b"a", b"b"]) == [STORED] * 2
    assert worker.get("t/open") == one("t/open", b"a")
    assert worker.get("t/open") == one("t/open", b"b")
    time.sleep(0.15)
    assert worker.call(b"monitor t 0 2\r\n", END) == one("t", b"a")
    assert worker.until(END) == one("t", b"b")
    assert worker.line() == END
    assert worker.call(b"confirm t 2\r\n") == END
    assert qint(c, "t", "items") == 0
    assert "Traceback" not in proc.read_log()


def test_a_peek_returns_a_read_past_its_open_timeout_as_a_get_does(erq_factory):
    """A peek shows the item a fetch at that moment would take: a read past open_timeout goes
    back to the head first (PROTOCOL §10). A peek missed it until the once-a-second timer
    came, while a get in the same request was handed it; a blocked peek woken by a set was
    shown the new item, behind the returned one."""
    proc, a = start(erq_factory, '[queues."t"]\nopen_timeout = "100ms"\n')
    peeker, setter = proc.client(), proc.client()
    for round_ in range(3):
        x = b"x%d" % round_
        assert a.set("t", x) == STORED
        assert a.get("t/open") == one("t/open", x)
        time.sleep(0.15)  # past open_timeout; the timer usually has not run yet
        assert peeker.get("t/peek t") == value("t/peek", x) + one("t", x), round_
        assert a.set("t", x) == STORED
        assert a.get("t/open") == one("t/open", x)
        peeker.send(b"get t/peek/t=5000\r\n")
        time.sleep(0.15)
        assert setter.set("t", b"y") == STORED
        assert peeker.until() == one("t/peek/t=5000", x), round_
        assert drain(setter, "t") == [x, b"y"]
        assert a.get("t/close t/close") == END  # used up by the timed-out reads
    assert "Traceback" not in proc.read_log()


def _time_out_and_reopen(proc: ErqProcess) -> tuple[RawClient, RawClient]:
    """``a`` opened "x", the read timed out and ``b`` holds "x" open now, with an open_timeout
    (reloaded) long enough that ``b``'s read stays open whatever the test's pace."""
    a, b = proc.client(), proc.client()
    assert a.set("t", b"x") == STORED
    assert a.get("t/open") == one("t/open", b"x")
    poll(lambda: qint(a, "t", "items") == 1, "the open read to time out")
    proc.write_config('[queues."t"]\nopen_timeout = "1h"\n')
    assert a.call(b"reload\r\n") == RELOADED
    assert b.get("t/open") == one("t/open", b"x")
    return a, b


def test_timed_out_read_reopened_by_another_connection_is_not_closed_by_the_first(erq_factory):
    proc, _ = start(erq_factory, OPEN_TIMEOUT)
    a, b = _time_out_and_reopen(proc)
    assert a.get("t/close") == END  # a holds nothing any more: nothing to confirm
    assert a.call(b"confirm t 1\r\n") == ERROR
    assert qint(a, "t", "open_transactions") == 1  # b's read is untouched
    b.close()  # ...so b's disconnect returns it
    poll(lambda: qint(a, "t", "items") == 1, "b's read to return at its disconnect")
    assert a.get("t") == one("t", b"x")


@pytest.mark.parametrize("how", ["close", "abort", "confirm"])
def test_the_close_of_a_timed_out_read_is_used_up_by_it_not_by_the_next_read(erq_factory, how):
    """``a`` opened "x", which timed out (``b`` holds it now), then opened "y". The close or
    abort ``a`` sends for "x" is used up by "x": it must not confirm (or put back) "y", which
    ``a`` is still working on. ``confirm t 2`` covers both: it confirms "y" only."""
    proc, _ = start(erq_factory, OPEN_TIMEOUT)
    a, b = _time_out_and_reopen(proc)
    assert a.set("t", b"y") == STORED
    assert a.get("t/open") == one("t/open", b"y")
    if how == "confirm":
        assert a.call(b"confirm t 2\r\n") == END
        assert qint(b, "t", "open_transactions") == 1  # b's "x" only
        a.close()
        b.close()
        poll(lambda: qint(proc.client(), "t", "items") == 1, "b's read to return")
        assert drain(proc.client(), "t") == [b"x"]
        return
    assert a.get(f"t/{how}") == END
    stats = qstats(b, "t")
    assert (stats["open_transactions"], stats["items"]) == ("2", "0")  # b's "x", a's "y"
    assert a.get("t/close") == END  # now "y"'s close
    assert qint(b, "t", "open_transactions") == 1
    a.close()
    # Without the close for "y" (a worker that dies with it): it comes back.
    a = proc.client()
    assert a.set("t", b"z") == STORED
    assert a.get("t/open") == one("t/open", b"z")
    assert a.get("t/abort") == END  # the oldest read a holds is "z"
    b.close()
    poll(lambda: qint(a, "t", "items") == 2, "b's read to return")
    assert drain(a, "t") == [b"x", b"z"]


def test_the_close_of_a_read_a_delete_dropped_is_used_up_by_it_not_by_the_next_read(server):
    """A delete drops the queue's open reads, but each keeps its place in its connection's
    line as a timed-out one does: ``a``'s close for "x" must not confirm "y", the read it
    opened on the queue made again, which it is still working on."""
    a, b = server.client(), server.client()
    assert a.set("t", b"x") == STORED
    assert a.get("t/open") == one("t/open", b"x")
    assert b.call(b"delete t\r\n") == DELETED
    assert b.set("t", b"y") == STORED
    assert a.get("t/open") == one("t/open", b"y")
    assert a.get("t/close") == END  # used up by "x", which the delete dropped
    assert qint(b, "t", "open_transactions") == 1  # "y" is still a's
    a.close()  # a worker that dies with "y": it comes back
    poll(lambda: qint(b, "t", "items") == 1, "a's read to return at its disconnect")
    assert drain(b, "t") == [b"y"]
    c = server.client()
    assert c.set("t", b"z") == STORED
    assert c.get("t/open") == one("t/open", b"z")
    assert b.call(b"delete t\r\n") == DELETED
    assert c.call(b"confirm t 1\r\n") == END  # the dropped read's confirm: nothing
    assert c.call(b"confirm t 1\r\n") == ERROR  # the line is empty now


def test_a_connections_line_of_reads_taken_back_stays_bounded(impl):
    """Reads taken back stay in the connection's line until their close, but a client that
    never closes cannot grow it without bound: at twice max_open_reads the oldest of them
    are forgotten, down to max_open_reads entries; live reads are always kept."""
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    from conftest import impl_module

    class Line:  # a queue in which the reads named "live" are still open
        def is_open(self, read) -> bool:
            return read.startswith("live")

    session_mod = impl_module(impl, "_session", "_session_py")
    state = ServerState(Config(), QueueCollection(Config(), None), None)
    session = session_mod.Session(state, None, lambda data: None, lambda: None)
    queue, limit = Line(), 3
    reads = session.open_deque("t")
    reads.extend((queue, name) for name in ["gone0", "live0", "gone1", "gone2", "live1"])
    assert not session.at_open_limit("t", limit) and session.unclosed_count("t") == 5
    reads = session.open_deque("t")
    reads.append((queue, "gone3"))  # six: twice the limit
    assert not session.at_open_limit("t", limit)
    assert [read for _, read in session.open_deque("t")] == ["live0", "live1", "gone3"]
    session.open_deque("t").append((queue, "live2"))
    assert session.at_open_limit("t", limit)


def test_a_connection_forgets_the_lines_of_queues_it_has_no_read_left_on(impl):
    """A pooled connection that reads a queue per request (a reply queue) keeps no line per
    name it ever met: empty lines are dropped as names come; lines with reads stay."""
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    from conftest import impl_module

    class Line:
        def is_open(self, read) -> bool:
            return True

        def confirm(self, read) -> bool:
            return True

        def unremove(self, read) -> bool:
            return True

        def sync_ticket(self) -> None:
            return None

    session_mod = impl_module(impl, "_session", "_session_py")
    state = ServerState(Config(), QueueCollection(Config(), None), None)
    session = session_mod.Session(state, None, lambda data: None, lambda: None)
    queue = Line()
    session.open_deque("kept").append((queue, "read"))
    for i in range(5_000):
        session.open_deque(f"reply{i}").append((queue, "read"))
        assert session.close_oldest(f"reply{i}") if i % 2 else session.abort_oldest(f"reply{i}")
    assert len(session.open_reads) <= 2 * session_mod.OPEN_NAMES_SLACK + 1
    assert session.unclosed_count("kept") == 1 and "reply4999" in session.open_reads


def test_lines_of_reads_all_taken_back_keep_a_count_not_their_queues(impl):
    """A connection that leaves a read open on each of many queues deleted under it (a reply
    queue per request) keeps, per name, only how many closes it has yet to use up: neither
    the deleted Queue nor its OpenRead. The rule holds all the same: the close of a read
    taken back is used up, and never confirms a read opened since under that name."""
    import gc
    import weakref

    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    class Deleted:  # a queue deleted under the connection: its reads were all taken back
        def is_open(self, read) -> bool:
            return False

        def confirm(self, read) -> bool:
            return False

        def unremove(self, read) -> bool:
            return False

        def unremove_all(self, reads) -> int:
            return 0

    class Live:  # the queue made again under a name: its reads are open
        def __init__(self) -> None:
            self.confirmed, self.aborted = [], []

        def is_open(self, read) -> bool:
            return read not in self.confirmed and read not in self.aborted

        def confirm(self, read) -> bool:
            self.confirmed.append(read)
            return True

        def unremove(self, read) -> bool:
            self.aborted.append(read)
            return True

        def unremove_all(self, reads) -> int:
            self.aborted.extend(reads)
            return len(reads)

        def sync_ticket(self) -> None:
            return None

    session_mod = impl_module(impl, "_session", "_session_py")
    state = ServerState(Config(), QueueCollection(Config(), None), None)
    session = session_mod.Session(state, None, lambda data: None, lambda: None)
    deleted = []
    for i in range(session_mod.MAX_TAKEN_BACK_NAMES - 2 * session_mod.OPEN_NAMES_SLACK):
        queue = Deleted()
        deleted.append(weakref.ref(queue))
        reads = session.open_deque(f"reply{i}")
        reads.extend([(queue, "read")] * (1 + i % 3))
        del queue, reads
    gc.collect()
    held = sum(ref() is not None for ref in deleted)
    assert held <= session_mod.OPEN_NAMES_SLACK, held
    assert len(session.open_reads) <= session_mod.OPEN_NAMES_SLACK
    assert [session.unclosed_count(f"reply{i}") for i in range(6)] == [1, 2, 3, 1, 2, 3]
    assert session.unclosed_count("never") == 0 and not session.has_open("reply1")
    assert not session.close_oldest("reply0") and session.unclosed_count("reply0") == 0
    assert not session.close_oldest("reply0")  # nothing left to use up
    assert not session.abort_oldest("reply1") and session.unclosed_count("reply1") == 1

    # reply2 is made again and read: its two closes taken back come first.
    live = Live()
    session.open_deque("reply2").append((live, "new"))
    assert session.unclosed_count("reply2") == 4 and session.live_open_count("reply2") == 1
    assert not session.close_oldest("reply2") and not session.abort_oldest("reply2")
    assert not session.close_oldest("reply2") and live.confirmed == []
    assert session.close_oldest("reply2") and live.confirmed == ["new"]

    # At twice max_open_reads, reads taken back are forgotten down to the limit, whether the
    # line is kept as entries or as a count.
    assert session.unclosed_count("reply5") == 3
    assert not session.at_open_limit("reply5", 1) and session.unclosed_count("reply5") == 1
    assert not session.at_open_limit("reply4", 2) and session.unclosed_count("reply4") == 2

    # A connection that ends gives back its live reads; the counts just go.
    session.open_deque("reply5").append((live, "open at the end"))
    session.abort_all()
    assert live.aborted == ["open at the end"] and session.unclosed_count("reply4") == 0


def test_a_connection_keeps_counts_of_reads_taken_back_for_its_latest_names_only(impl):
    """A pooled connection that never closes the reads of reply queues deleted under it keeps
    counts for the last MAX_TAKEN_BACK_NAMES names, not for every queue it ever met (~120
    bytes each, for as long as it stays connected)."""
    from erq.config import Config
    from erq.queues import QueueCollection
    from erq.state import ServerState

    class Deleted:
        def is_open(self, read) -> bool:
            return False

    session_mod = impl_module(impl, "_session", "_session_py")
    state = ServerState(Config(), QueueCollection(Config(), None), None)
    session = session_mod.Session(state, None, lambda data: None, lambda: None)
    queue, names = Deleted(), 5_000
    for i in range(names):
        session.open_deque(f"reply{i}").append((queue, "read"))
    counted = [i for i in range(names) if session.unclosed_count(f"reply{i}")]
    assert len(counted) <= session_mod.MAX_TAKEN_BACK_NAMES + session_mod.OPEN_NAMES_SLACK
    assert counted[-100:] == list(range(names - 100, names))  # the latest are kept
    assert counted[0] > names - 2 * session_mod.MAX_TAKEN_BACK_NAMES  # the oldest forgotten


def test_timed_out_read_reopened_by_another_connection_does_not_fail_a_plain_get(erq_factory):
    proc, _ = start(erq_factory, OPEN_TIMEOUT)
    a, b = _time_out_and_reopen(proc)
    assert a.call(b"get t\r\n") == END  # a holds no open read: a plain get is fine
    assert not a.is_closed(0.2)
    stats = qstats(a, "t")
    assert (stats["open_transactions"], stats["items"]) == ("1", "0")
    assert b.get("t/close") == END
    assert qint(a, "t", "open_transactions") == 0


# ---- fanout ------------------------------------------------------------------------------------
def test_fanout_child_gets_copies_from_when_it_exists_and_counts_them(erq_factory):
    proc, c = start(erq_factory)
    assert c.set("f", b"before") == STORED
    assert c.get("f+c") == END  # the child exists from now on
    before = c.stats()
    assert c.set("f", b"after", flags=4) == STORED
    after = c.stats()
    assert int(after["cmd_set"]) == int(before["cmd_set"]) + 1
    assert int(after["total_items"]) == int(before["total_items"]) + 2
    assert (after["queue_f_total_items"], after["queue_f+c_total_items"]) == ("2", "1")
    assert after["queue_f_children"] == "f+c"
    # A child is an ordinary queue: open, abort, set directly.
    assert c.get("f+c/open") == one("f+c/open", b"after", 4)
    assert c.get("f+c/abort") == END
    assert c.set("f+c", b"direct") == STORED
    assert drain(c, "f+c") == [b"after", b"direct"]
    assert drain(c, "f") == [b"before", b"after"]
    # A second child, and a status refusal refuses the copies too.
    assert c.get("f+d") == END
    assert sorted(c.stats()["queue_f_children"].split(",")) == ["f+c", "f+d"]
    assert c.call(b"status READONLY\r\n") == END
    assert c.set("f", b"refused") == READ_ONLY
    assert c.call(b"status UP\r\n") == END
    assert [qint(c, q, "items") for q in ("f", "f+c", "f+d")] == [0, 0, 0]


def test_fanout_child_gets_a_copy_when_the_parent_refuses_and_the_reply_is_the_parents(
    erq_factory,
):
    config = """
[queues."r"]
max_items = 1
max_item_size = 4
[queues."r+c"]
max_items = "none"
max_item_size = "none"
[queues."s+c"]
max_items = 0
"""
    proc, c = start(erq_factory, config)
    assert c.get("r+c") == END
    assert c.set("r", b"one") == STORED
    assert c.set("r", b"two") == NOT_STORED  # parent full
    assert c.set("r+c", b"x") == STORED
    assert c.call(b"flush r\r\n") == END
    assert c.set("r", b"toolong") == NOT_STORED  # over the parent's max_item_size
    assert drain(c, "r+c") == [b"one", b"two", b"x", b"toolong"]
    assert qint(c, "r", "total_items") == 1
    # The other way round: a child's refusal does not change the parent's STORED.
    assert c.get("s+c") == END
    assert c.set("s", b"y") == STORED
    assert (qint(c, "s", "items"), qint(c, "s+c", "items")) == (1, 0)


@pytest.mark.parametrize(
    "blocked, children",
    [("f+a", "f+a,f+new"), ("f", "f+new")],
    ids=["woken-on-a-child", "woken-on-the-parent"],
)
def test_a_fanout_child_made_by_a_get_the_set_wakes_gets_no_copy_of_that_set(
    erq_factory, blocked, children
):
    # A set wakes a get blocked on f+a (by its copy there) or on f itself (f had no child yet)
    # whose next key makes f+new: the child exists only from after that set, so it gets no
    # copy of it (PROTOCOL §7), only later ones.
    proc, c = start(erq_factory)
    w = proc.client()
    if blocked != "f":
        assert c.get(blocked) == END
    w.send(b"get %s/t=3000 f+new\r\n" % blocked.encode())
    time.sleep(0.2)  # w is blocked
    assert c.set("f", b"one") == STORED
    assert w.until() == one(f"{blocked}/t=3000", b"one")
    assert c.stats()["queue_f_children"] == children
    assert (qint(c, "f+new", "items"), qint(c, "f+new", "total_items")) == (0, 0)
    assert c.set("f", b"two") == STORED
    assert drain(c, "f+new") == [b"two"]


def test_fanout_children_inherit_the_parents_config(erq_factory):
    config = """
[queues."p"]
max_items = 1
fsync = "always"
"""
    proc, c = start(erq_factory, config)
    assert c.get("p+c") == END
    assert dump_config(c, "p+c")["p+c"] == dict(DEFAULT_CONFIG, max_items="1", fsync="always")
    assert c.set("p+c", b"direct") == STORED
    assert c.set("p+c", b"again") == NOT_STORED
    assert c.set("p", b"a") == STORED  # the copy is refused by the full child
    assert (qint(c, "p", "items"), qint(c, "p+c", "items")) == (1, 1)
    assert drain(c, "p+c") == [b"direct"]


def test_deleting_a_child_unregisters_it_deleting_the_parent_does_not(erq_factory):
    proc, c = start(erq_factory)
    assert c.get("f+c") == END and c.get("g+c") == END
    assert c.call(b"delete f+c\r\n") == DELETED
    assert c.set("f", b"x") == STORED
    assert qstats(c, "f+c") is None  # not re-created by the copy
    assert "queue_f_children" not in c.stats()
    assert c.call(b"delete g\r\n") == DELETED  # "g" never existed: the child stays registered
    assert c.set("g", b"y") == STORED
    assert c.call(b"delete g\r\n") == DELETED
    assert c.set("g", b"z") == STORED
    assert drain(c, "g+c") == [b"y", b"z"]
    assert c.stats()["queue_g_children"] == "g+c"


def test_fanout_children_survive_a_crash_and_a_restart(erq_factory):
    proc, c = start(erq_factory)
    assert c.get("h+c") == END  # an empty child
    assert c.set("h", b"1") == STORED
    c = restart(proc, crash=True)
    assert c.set("h", b"2") == STORED
    c = restart(proc, crash=False)
    assert c.set("h", b"3") == STORED
    assert drain(c, "h+c") == [b"1", b"2", b"3"]
    assert c.stats()["queue_h_children"] == "h+c"


def test_memory_only_fanout_child_survives_a_restart(erq_factory):
    config = """
[queues."j+a"]
journal = false
"""
    proc, c = start(erq_factory, config)
    assert c.get("j+a") == END
    assert c.set("j", b"before") == STORED
    c = restart(proc, crash=False)
    assert c.get("j+a") == END  # its items are gone (memory only)...
    c = restart(proc, crash=False)
    assert c.set("j", b"after") == STORED  # ...but the child itself is still registered
    assert c.get("j+a") == one("j+a", b"after")


@pytest.mark.parametrize("journal", ["true", "false"])
def test_a_child_made_again_by_a_get_its_delete_woke_stays_registered(erq_factory, journal):
    """``delete`` answers a get blocked on the child END, and that get's next key names the
    child again, which makes it anew at once, inside the delete. The delete then unregistered
    the new child (and, memory only, removed its directory): it got no copies from its
    parent until a restart registered it again."""
    proc, c = start(erq_factory, f'[queues."k+c"]\njournal = {journal}\n')
    waiter = proc.client()
    assert c.get("k+c") == END
    waiter.send(b"get k+c/t=5000 k+c\r\n")
    poll(lambda: qint(c, "k+c", "waiters") == 1, "the get to block on the child")
    assert c.call(b"delete k+c\r\n") == DELETED
    assert waiter.until() == END  # the blocked key ended; the next one made the child again
    assert c.set("k", b"x") == STORED
    assert c.stats()["queue_k_children"] == "k+c"
    assert c.get("k+c") == one("k+c", b"x")
    c = restart(proc, crash=False)
    assert c.set("k", b"y") == STORED
    assert c.get("k+c") == one("k+c", b"y")


# ---- journal, fsync, max_memory_size -----------------------------------------------------------
def test_journal_false_keeps_a_queue_in_memory_only_and_others_durable(erq_factory):
    config = """
[queues."mem"]
journal = false
"""
    proc, c = start(erq_factory, config)
    for crash in (True, False):
        assert pipeline_sets(c, "mem", [b"m1", b"m2"]) == [STORED] * 2
        assert c.set("disk", b"d") == STORED
        assert c.get("mem/open") == one("mem/open", b"m1")
        stats = qstats(c, "mem")
        assert (stats["items"], stats["logsize"]) == ("1", "0")
        c = restart(proc, crash)
        assert c.get("mem") == END
        assert qint(c, "mem", "items") == 0
    assert drain(c, "disk") == [b"d", b"d"]


def test_fsync_always_never_and_a_period_all_store_durably(erq_factory):
    config = """
[queues."fa"]
fsync = "always"
[queues."fn"]
fsync = "never"
[queues."fp"]
fsync = "50ms"
"""
    proc, c = start(erq_factory, config)
    payloads = [b"item %02d" % i for i in range(30)]
    for name in ("fa", "fn", "fp"):
        assert pipeline_sets(c, name, payloads) == [STORED] * 30
    # Concurrent writers under "always" share fsyncs and all hear STORED.
    writers = [proc.client() for _ in range(4)]
    for i, w in enumerate(writers):
        w.send(b"".join(set_req(b"fa", b"w%d-%d" % (i, j)) for j in range(10)))
    for w in writers:
        assert [w.line() for _ in range(10)] == [STORED] * 10
    assert [dump_config(c, q)[q]["fsync"] for q in ("fa", "fn", "fp")] == ["always", "never", "50"]
    c = restart(proc, crash=True)
    assert qint(c, "fa", "items") == 70
    for name in ("fn", "fp"):
        assert drain(c, name) == payloads
    assert drain(c, "fa")[:30] == payloads


def test_max_memory_size_bounds_memory_while_the_queue_grows_and_keeps_fifo(erq_factory, impl):
    # What an item in RAM costs the server: its data plus the build's per-item overhead.
    ring = importlib.import_module("erq._fast._ring" if impl == "c" else "erq._ring_py")
    item_cost = 100 + ring.ITEM_OVERHEAD
    config = """
[queues."rb"]
max_memory_size = "1KiB"
"""
    proc, c = start(erq_factory, config)
    payloads = [b"%04d" % i + b"." * 96 for i in range(200)]  # 20,000 bytes in 100-byte items
    assert pipeline_sets(c, "rb", payloads[:100]) == [STORED] * 100
    stats = qstats(c, "rb")
    assert (stats["items"], stats["bytes"]) == ("100", "10000")
    assert 0 < int(stats["mem_bytes"]) <= 1024
    assert 0 < int(stats["mem_items"]) * item_cost <= 1024
    got = []
    for i in range(50):
        reply = c.get("rb")
        got.append(reply)
        if i % 10 == 0:
            assert int(qstats(c, "rb")["mem_bytes"]) <= 1024
    assert got == [one("rb", p) for p in payloads[:50]]
    assert pipeline_sets(c, "rb", payloads[100:]) == [STORED] * 100
    assert int(qstats(c, "rb")["mem_bytes"]) <= 1024
    # A reliable read and its abort keep the order; a crash loses nothing and keeps it too.
    assert c.get("rb/open") == one("rb/open", payloads[50])
    assert c.get("rb/abort") == END
    c = restart(proc, crash=True)
    stats = qstats(c, "rb")
    assert (stats["items"], stats["bytes"]) == ("150", "15000")
    assert int(stats["mem_bytes"]) <= 1024
    assert 0 < int(stats["mem_items"]) * item_cost <= 1024  # recovery keeps the same budget
    rest = drain(c, "rb")
    assert rest == payloads[50:]
    assert qint(c, "rb", "mem_bytes") == 0
