"""The wall clock both builds stamp items with: milliseconds since the epoch, as time.time_ns."""

from __future__ import annotations

import time

from erq.config import QueueConfig

from conftest import impl_module


def test_now_ms_reads_the_wall_clock_in_milliseconds(impl):
    clock = impl_module(impl, "_clock", "_clock_py")
    for _ in range(1000):
        before = time.time_ns() // 1_000_000
        now = clock.now_ms()
        after = time.time_ns() // 1_000_000
        assert type(now) is int
        assert before <= now <= after


def test_a_queue_stamps_items_with_its_clock_the_default_one_or_a_given_one(impl):
    clock = impl_module(impl, "_clock", "_clock_py")
    queue_mod = impl_module(impl, "_queue", "_queue_py")
    config = QueueConfig()

    fake = queue_mod.Queue("fake", config, None, clock=lambda: 12_345)
    fake.add(b"x", 0, 0)
    assert fake.take(False).add_time == 12_345

    wall = queue_mod.Queue("wall", config, None, clock=clock.now_ms)
    before = time.time_ns() // 1_000_000
    wall.add(b"x", 0, 0)
    after = time.time_ns() // 1_000_000
    assert before <= wall.take(False).add_time <= after
