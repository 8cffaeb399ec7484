"""erq.throttle: a reason's log line at most once per interval, with the count left out."""

from __future__ import annotations

import logging

from erq import throttle


def test_one_line_per_interval_then_the_count_of_those_left_out(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    line = throttle.Throttle(logging.getLogger("erq.test"), logging.WARNING, interval=10.0)
    with caplog.at_level(logging.WARNING, logger="erq.test"):
        for _ in range(5):
            line.log("refused %s", "a")
        now[0] += 9.9
        line.log("refused %s", "b")
        now[0] += 0.2
        line.log("refused %s", "c")
        now[0] += 10.0
        line.log("refused %s", "d")
        now[0] += 1.0
        line.log("refused %s", "e")  # left out, and told long after: the time is the true one
        now[0] += 79.0
        line.log("refused %s", "f")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused c (and 5 more like it since the last such line, 10 s ago)",
        "refused d",
        "refused f (and 1 more like it since the last such line, 80 s ago)",
    ]
