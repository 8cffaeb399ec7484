"""Deadlines: the timeouts of blocked requests on one loop timer, on both builds."""

from __future__ import annotations

import asyncio

import pytest

from conftest import impl_module


@pytest.fixture
def deadlines_class(impl):
    return impl_module(impl, "_state", "_state_py").Deadlines


class Entry:
    def __init__(self, name: str, log: list, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.log = log
        self.loop = loop
        self.added = loop.time()

    def expire(self) -> None:
        self.log.append((self.name, self.loop.time() - self.added))


def run(body):
    return asyncio.run(body())


def test_entries_expire_in_deadline_order_and_never_early(deadlines_class):
    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        log: list = []
        done = loop.create_future()
        for name, delay in (("late", 0.06), ("early", 0.02), ("middle", 0.04)):
            deadlines.add(Entry(name, log, loop), delay)
        deadlines.add(type("Last", (), {"expire": lambda self: done.set_result(None)})(), 0.08)
        await done
        return log

    log = run(body)
    assert [name for name, _ in log] == ["early", "middle", "late"]
    for (_, waited), delay in zip(log, (0.02, 0.04, 0.06), strict=True):
        assert waited >= delay


def test_a_discarded_entry_does_not_expire(deadlines_class):
    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        log: list = []
        done = loop.create_future()
        gone = Entry("gone", log, loop)
        key = deadlines.add(gone, 0.01)
        deadlines.add(Entry("kept", log, loop), 0.01)
        deadlines.discard(gone, key)
        deadlines.discard(gone, key)  # twice, or after its time: nothing happens
        deadlines.add(type("Last", (), {"expire": lambda self: done.set_result(None)})(), 0.03)
        await done
        return log

    assert [name for name, _ in run(body)] == ["kept"]


def test_an_earlier_deadline_rearms_the_timer(deadlines_class):
    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        log: list = []
        first = loop.create_future()
        deadlines.add(Entry("slow", log, loop), 5.0)
        deadlines.add(type("Fast", (), {"expire": lambda self: first.set_result(None)})(), 0.01)
        await asyncio.wait_for(first, 2.0)  # not held back until the 5 s timer
        assert log == []
        deadlines.close()  # the 5 s entry is dropped with its timer

    run(body)


def test_an_expire_that_adds_a_deadline_keeps_the_timer_armed(deadlines_class):
    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        done = loop.create_future()

        class Again:
            count = 0

            def expire(self):
                Again.count += 1
                if Again.count < 3:
                    deadlines.add(self, 0.005)
                else:
                    done.set_result(Again.count)

        deadlines.add(Again(), 0.005)
        return await asyncio.wait_for(done, 2.0)

    assert run(body) == 3


class ManualLoop:
    """A loop stand-in whose clock the test moves and whose timers the test fires."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[ManualTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback) -> ManualTimer:
        timer = ManualTimer(when, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[float]:
        return [t.when for t in self.timers if not t.cancelled and not t.fired]

    def fire_due(self) -> None:
        for timer in list(self.timers):
            if not timer.cancelled and not timer.fired and timer.when <= self.now:
                timer.fired = True
                timer.callback()


class ManualTimer:
    def __init__(self, when: float, callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_later_deadline_added_by_an_expire_does_not_delay_an_earlier_one(deadlines_class):
    loop = ManualLoop()
    deadlines = deadlines_class(loop)
    log: list = []

    class Chain:  # like a multi-key get whose first key times out and whose next one blocks
        def expire(self):
            log.append("first")
            deadlines.add(Named("third"), 0.5)

    class Named:
        def __init__(self, name):
            self.name = name

        def expire(self):
            log.append(self.name)

    deadlines.add(Chain(), 0.01)
    second = deadlines.add(Named("second"), 0.06)
    loop.now += 0.02
    loop.fire_due()
    assert log == ["first"]
    assert loop.armed() == [second / 1000.0]  # the timer waits for "second", not "third"
    loop.now += 0.05
    loop.fire_due()
    assert log == ["first", "second"]
    loop.now += 1.0
    loop.fire_due()
    assert log == ["first", "second", "third"]
    assert loop.armed() == []


class Quiet:
    def expire(self) -> None:  # pragma: no cover - discarded before its time
        raise AssertionError("a discarded entry expired")


def test_what_is_held_is_bounded_by_the_pending_deadlines(deadlines_class):
    """A consumer looping on a long /t= leaves nothing behind per answered get."""
    import tracemalloc

    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        keep = Quiet()
        deadlines.add(keep, 3600.0)  # one deadline stays pending throughout
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(50_000):
                entry = Quiet()
                # Each in its own millisecond bucket, an hour away, answered at once.
                deadline = deadlines.add(entry, 3600.0 + i / 1000.0)
                deadlines.discard(entry, deadline)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # An emptied bucket left behind per get was ~10 MB for these 50,000.
        assert grown < 200_000, grown
        deadlines.discard(keep, deadlines.add(keep, 0.0))
        deadlines.close()

    run(body)


def test_deadlines_pushed_again_after_their_bucket_emptied_expire_once(deadlines_class):
    async def body():
        loop = asyncio.get_running_loop()
        deadlines = deadlines_class(loop)
        log: list = []
        done = loop.create_future()
        # The same deadline emptied and filled again, over and over (each time a heap entry).
        for _ in range(300):
            first = Quiet()
            deadline = deadlines.add(first, 0.03)
            deadlines.discard(first, deadline)
        for name in ("a", "b"):
            deadlines.add(Entry(name, log, loop), 0.03)
        deadlines.add(type("Last", (), {"expire": lambda self: done.set_result(None)})(), 0.06)
        await asyncio.wait_for(done, 2)
        assert sorted(name for name, _ in log) == ["a", "b"]
        assert all(waited >= 0.03 for _, waited in log)
        deadlines.close()

    run(body)


def test_entries_sharing_a_millisecond_expire_or_are_discarded_each_on_its_own(deadlines_class):
    """A bucket holds its one entry as it is and several in a dict: every way from one form
    to the other keeps the entries still pending, and only those, and each expires once."""
    loop = ManualLoop()
    deadlines = deadlines_class(loop)
    log: list = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def expire(self) -> None:
            log.append(self.name)

    a, b, c, d, e = (Named(n) for n in "abcde")
    at = deadlines.add(a, 0.01)
    assert deadlines.add(a, 0.01) == at  # the same entry twice in its bucket: once
    assert deadlines.add(b, 0.01) == at  # a second: the bucket becomes a dict
    deadlines.discard(a, at)
    deadlines.discard(a, at)  # twice: nothing more
    assert deadlines.add(c, 0.01) == at
    lone = deadlines.add(d, 0.02)  # a bucket of one entry
    deadlines.discard(e, lone)  # an entry not in it takes nothing out
    loop.now += 0.015
    loop.fire_due()
    assert sorted(log) == ["b", "c"]
    deadlines.discard(b, at)  # after its time: nothing happens
    loop.now += 0.01
    loop.fire_due()
    assert sorted(log) == ["b", "c", "d"]
    # Emptied from two entries to one and then to none: its time passes quietly.
    f = Named("f")
    late = deadlines.add(e, 0.05)
    assert deadlines.add(f, 0.05) == late
    deadlines.discard(e, late)
    deadlines.discard(f, late)
    loop.now += 0.1
    loop.fire_due()
    assert sorted(log) == ["b", "c", "d"]
    assert loop.armed() == []
