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
