"""The wall clock both builds stamp items with: milliseconds since the epoch, as time.time_ns."""

from __future__ import annotations

import time

import pytest

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


def test_the_stamp_clock_is_the_wall_clock_outside_a_pass_of_the_connection_layer(impl):
    clock = impl_module(impl, "_clock", "_clock_py")
    for _ in range(1000):
        before = time.time_ns() // 1_000_000
        now = clock.stamp_ms()
        after = time.time_ns() // 1_000_000
        assert type(now) is int
        assert before <= now <= after


def _next_millisecond() -> int:
    start = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == start:
        pass
    return start


def test_within_a_pass_stamps_share_one_reading_of_the_clock_per_32(request):
    """The compiled connection layer's pass (erq/_fast/_epoll.pyx, Hub._ready): the pure
    build has no such layer, and its stamp clock is the clock itself (above)."""
    if not request.config.getoption("--c-extensions"):
        pytest.skip("--no-c-extensions: the pass is the compiled connection layer's")
    from erq._fast import _clock

    _clock.begin_pass()
    try:
        first = _clock.stamp_ms()
        _next_millisecond()
        group = [_clock.stamp_ms() for _ in range(31)]
        assert group == [first] * 31  # 32 stamps, one reading, though the clock moved on
        _next_millisecond()
        before = time.time_ns() // 1_000_000
        fresh = _clock.stamp_ms()  # the 33rd: read anew
        assert fresh >= before > first
        _next_millisecond()
        assert _clock.stamp_ms() == fresh
    finally:
        _clock.end_pass()
    before = time.time_ns() // 1_000_000
    assert _clock.stamp_ms() >= before  # after the pass: the clock itself again
    _clock.begin_pass()  # a new pass reads anew at its first stamp
    try:
        _next_millisecond()
        before = time.time_ns() // 1_000_000
        assert _clock.stamp_ms() >= before
    finally:
        _clock.end_pass()
