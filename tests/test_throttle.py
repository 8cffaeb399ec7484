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


def test_a_refusal_at_a_limit_does_not_hide_a_journal_failure_in_the_log(monkeypatch, caplog):
    """Refusals at a limit (a client past max_queues, say) and failures (a full disk) are
    throttled apart: one of each gets its line within one interval."""
    from erq.journal_api import JournalError, TooManyQueues
    from erq.replies import _JournalFailedLog

    now = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    log = _JournalFailedLog()
    with caplog.at_level(logging.WARNING, logger="erq.commands"):
        log.log("set %s: %s", "q1", TooManyQueues("too many queues (max_queues = 1)"))
        log.log("set %s: %s", "q2", TooManyQueues("too many queues (max_queues = 1)"))
        now[0] += 1.0
        log.log("set %s: %s", "q", JournalError("cannot write: No space left on device"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "set q1: too many queues (max_queues = 1)"),
        ("ERROR", "set q: cannot write: No space left on device"),
    ]
