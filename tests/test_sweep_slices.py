"""The periodic sweep (expiry, open-read timeouts, idle queues, compaction, journal files) is
spread over loop passes, a slice of queues at a time, so that a server with thousands of
queues does not hold every request back while it sweeps them all. Both implementations.

The check runs in a server started in its own process (the build is chosen at import), with a
slice of zero seconds: each pass of the loop then sweeps exactly one queue.
"""

from __future__ import annotations

from pathlib import Path

from support import run_script

SCRIPT = r"""
import asyncio, json, sys, time
import erq.server as server_module
from erq.clock import now_ms
from erq.config import load_config

QUEUES, DEEP = 5, 3 * 256 + 10

async def main(data_dir, deep):
    server_module.SWEEP_SLICE = 0.0
    config = load_config(None, cli={"port": 0, "admin_port": 0, "data_dir": data_dir})
    server = server_module.Server(config)
    await server.start()
    queues = server.state.queues
    names = ["deep"] if deep else [f"q{i}" for i in range(QUEUES)]
    for name in names:  # one item each (or DEEP in one queue), expired 50 ms from now
        for _ in range(DEEP if deep else 1):
            queues.add(name, b"x", 0, now_ms() + 50, None)
    await asyncio.sleep(0.2)
    server._sweeper.cancel()
    server._next_expiry = 0.0  # this sweep expires items
    left = lambda: sum(queues.get(name).items for name in names)
    server._sweep()
    after_first_slice = left()
    passes = 0
    while not isinstance(server._sweeper, asyncio.TimerHandle) and passes < 50:
        await asyncio.sleep(0)
        passes += 1
    result = {
        "after_first_slice": after_first_slice,
        "left": left(),
        "passes": passes,
        "next_sweep_is_a_timer": isinstance(server._sweeper, asyncio.TimerHandle),
    }
    server.request_shutdown("test")
    await server.shutdown()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1], sys.argv[2] == "deep"))
"""


def sweep(impl: str, tmp_path: Path, shape: str) -> dict:
    return run_script(impl, SCRIPT, str(tmp_path / "data"), shape)


def test_a_sweep_over_many_queues_is_spread_over_loop_passes(impl, tmp_path):
    result = sweep(impl, tmp_path, "many")
    # The first slice swept one queue; the loop served its other callbacks before each of
    # the next four; the next sweep was scheduled once every queue had been swept.
    assert result["after_first_slice"] == 4, result
    assert result["left"] == 0 and result["passes"] >= 4, result
    assert result["next_sweep_is_a_timer"], result


def test_the_expiry_of_a_deep_queue_is_spread_over_loop_passes(impl, tmp_path):
    """Items expired at one queue's head go EXPIRY_BATCH at a time, the loop serving
    its sockets in between: a million expiring at once must not stall every client."""
    from erq.queue import EXPIRY_BATCH

    assert EXPIRY_BATCH == 256  # the script's DEEP is 3 batches and a bit
    result = sweep(impl, tmp_path, "deep")
    assert result["after_first_slice"] == 3 * 256 + 10 - 256, result
    assert result["left"] == 0 and result["passes"] >= 3, result
    assert result["next_sweep_is_a_timer"], result
