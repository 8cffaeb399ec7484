"""The ring-buffer FIFO: Cython and pure-Python builds against a deque model."""

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import impl_module


@pytest.fixture
def Ring(impl):
    return impl_module(impl, "_ring", "_ring_py").Ring


def test_push_pop_is_fifo(Ring):
    ring = Ring()
    for i in range(1000):
        ring.push(i)
    assert len(ring) == 1000
    assert [ring.pop() for _ in range(1000)] == list(range(1000))
    assert not ring


def test_push_front_is_handed_out_next(Ring):
    ring = Ring()
    ring.push("a")
    ring.push("b")
    ring.push_front("z")
    assert ring.peek() == "z"
    assert ring.peek_tail() == "b"
    assert [ring.pop(), ring.pop(), ring.pop()] == ["z", "a", "b"]


def test_capacity_doubles_and_clear_shrinks(Ring):
    ring = Ring(16)
    assert ring.capacity == 16
    for i in range(17):
        ring.push(i)
    assert ring.capacity == 32
    ring.clear()
    assert len(ring) == 0 and ring.capacity == 16
    ring.push(1)
    assert ring.pop() == 1


def test_growth_while_wrapped_keeps_order(Ring):
    ring = Ring(4)
    for i in range(3):
        ring.push(i)
    ring.pop()
    ring.pop()
    for i in range(3, 10):
        ring.push(i)
    ring.push_front(1)
    assert ring.to_list() == list(range(1, 10))
    assert list(ring) == list(range(1, 10))


def test_shrink_gives_back_the_room_of_a_drained_burst_and_keeps_the_order(Ring):
    ring = Ring(16)
    for start in range(0, 40, 7):  # the head at several places in the old array
        ring.clear()
        for _ in range(start):
            ring.push(-1)
            ring.pop()
        for i in range(1000):
            ring.push(i)
        for _ in range(990):
            ring.pop()
        ring.push_front("front")
        assert ring.capacity == 1024
        assert ring.shrink() and ring.capacity == 32  # at least twice the 11 left
        assert ring.to_list() == ["front", *range(990, 1000)]
        assert not ring.shrink()
        ring.push("tail")
        assert [ring.pop() for _ in range(12)] == ["front", *range(990, 1000), "tail"]


def test_shrink_keeps_a_ring_a_quarter_full_and_never_goes_below_its_initial_size(Ring):
    ring = Ring(16)
    for i in range(256):
        ring.push(i)
    for _ in range(192):  # 64 left: exactly a quarter of 256
        ring.pop()
    assert ring.shrink() and ring.capacity == 128
    ring.push(256)  # 65 of 128: more than a quarter
    assert not ring.shrink() and ring.capacity == 128
    while ring:
        ring.pop()
    assert ring.shrink() and ring.capacity == 16
    assert not ring.shrink() and ring.capacity == 16


def test_empty_ring_raises(Ring):
    ring = Ring()
    with pytest.raises(IndexError):
        ring.pop()
    with pytest.raises(IndexError):
        ring.peek()
    with pytest.raises(IndexError):
        ring.peek_tail()


def test_an_item_released_by_clear_finds_the_ring_empty_and_usable(Ring):
    """clear released each item while the ring still counted it: an item whose release ran
    code popping from the ring (a __del__) was handed out as it was freed, and freed twice
    (a crash under AddressSanitizer in the compiled build)."""
    ring = Ring()
    seen: list = []

    class Reentrant:
        def __del__(self):
            seen.append(len(ring))
            if ring:
                seen.append(ring.pop())
            ring.push("pushed while clearing")

    for _ in range(40):  # past the first capacity: clear shrinks it too
        ring.push(Reentrant())
    ring.clear()
    assert seen == [0] + [1, "pushed while clearing"] * 39
    assert len(ring) == 1 and ring.pop() == "pushed while clearing"
    ring.push("after")
    assert ring.pop() == "after" and not ring


def test_a_capacity_past_what_memory_holds_is_refused(Ring):
    with pytest.raises((MemoryError, OverflowError)):
        Ring(2**62 + 1)  # the compiled ring doubled its size until it wrapped, and spun


def test_items_are_released(Ring):
    import gc
    import weakref

    class Token:
        pass

    ring = Ring()
    token = Token()
    ref = weakref.ref(token)
    ring.push(token)
    del token
    assert ref() is not None
    ring.pop()
    gc.collect()
    assert ref() is None
    token2 = Token()
    ref2 = weakref.ref(token2)
    ring.push(token2)
    del token2
    del ring
    gc.collect()
    assert ref2() is None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers()),
        st.tuples(st.just("front"), st.integers()),
        st.just(("pop", 0)),
        st.just(("clear", 0)),
        st.just(("shrink", 0)),
    ),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_deque_model(impl, ops):
    Ring = impl_module(impl, "_ring", "_ring_py").Ring
    ring, model = Ring(4), deque()
    for op, value in ops:
        if op == "push":
            ring.push(value)
            model.append(value)
        elif op == "front":
            ring.push_front(value)
            model.appendleft(value)
        elif op == "pop":
            if model:
                assert ring.pop() == model.popleft()
            else:
                with pytest.raises(IndexError):
                    ring.pop()
        elif op == "shrink":
            ring.shrink()
        else:
            ring.clear()
            model.clear()
        assert len(ring) == len(model)
        assert ring.to_list() == list(model)


def test_item_keeps_its_fields_and_knows_when_it_expired(impl):
    Item = impl_module(impl, "_ring", "_ring_py").Item
    item = Item(2**64 - 1, b"\r\n\x00data", 2**32 - 1, 1_700_000_000_000, 0)
    assert (item.id, item.data, item.flags, item.add_time, item.expiry) == (
        2**64 - 1,
        b"\r\n\x00data",
        2**32 - 1,
        1_700_000_000_000,
        0,
    )
    assert not item.expired(2**62)  # expiry 0: never
    timed = Item(1, b"x", 0, 0, 1000)
    assert not timed.expired(999)
    assert timed.expired(1000) and timed.expired(1001)
