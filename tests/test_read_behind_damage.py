"""A record damaged on disk under a running server costs no other item (both builds).

Read-behind reads items back from the journal as the head drains. When a record there no
longer passes its check (the disk changed it), the items read before it in the same batch,
and the item whose take asked for the batch, must still reach the client: they were
journaled as taken or are still live. The damaged one is reported (SERVER_ERROR for the gets
that reach it, nothing taken); a restart reports and skips it, and serves every item after it.
"""

from __future__ import annotations

import signal

from support import END

SIZE = 1000


def value(i: int) -> bytes:
    return (b"item-%04d-" % i).ljust(SIZE, b"v")


def damage_record_of(data_dir, queue: str, data: bytes) -> None:
    """Flip a byte inside the data of the (one) ADD record that carries ``data``."""
    (segment,) = [p for p in (data_dir / queue).iterdir() if p.suffix == ".seg"]
    raw = bytearray(segment.read_bytes())
    at = raw.index(data) + SIZE // 2
    with open(segment, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0xFF]))


def test_a_damaged_record_read_back_costs_no_item_before_it_and_a_restart_serves_the_rest(
    erq_factory,
):
    server = erq_factory('[queues.default]\nmax_memory_size = "4KiB"\nfsync = "never"\n')
    client = server.client()
    for i in range(20):
        assert client.set("rb", value(i)) == b"STORED\r\n"
    stats = client.stats()
    assert int(stats["queue_rb_mem_items"]) < 5  # the rest only on disk
    damage_record_of(server.data_dir, "rb", value(10))

    served = []
    refused = 0
    for _ in range(20):
        line = client.call(b"get rb\r\n")
        if line.startswith(b"VALUE "):
            served.append(client.read_exact(SIZE + 2)[:-2])
            assert client.line() == END
        else:
            assert line.startswith(b"SERVER_ERROR"), line
            refused += 1
    assert served == [value(i) for i in range(10)]  # every item before the damaged one
    assert refused == 10
    assert client.stats()["queue_rb_items"] == "10"  # the damaged one and the 9 after it
    client.close()

    server.stop(signal.SIGKILL)
    server.start()
    client = server.client()
    after = [client.get("rb") for _ in range(10)]
    assert after[:9] == [
        b"VALUE rb 0 %d\r\n%s\r\nEND\r\n" % (SIZE, value(i)) for i in range(11, 20)
    ]
    assert after[9] == END
    assert "skipped" in server.read_log() or "damaged" in server.read_log()
    client.close()
